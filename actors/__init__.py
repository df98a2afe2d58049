"""berthd's actors: one module per service, each run as its own process by the supervisor."""
