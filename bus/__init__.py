"""The transport: msgpack envelopes over ZeroMQ between clients, the router and the actors."""
