"""HTTP and WebSocket handlers: thin, they translate between the wire and the service."""
