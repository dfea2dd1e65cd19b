"""What is said on the wire by the balancer itself and by the tutorial's programs.

The tutorial's protocol: a request is a line; the sample service answers a number N
with `It's instance number N` (INSTANCE_PREFIX + N), the health check message with
itself, anything else with `Invalid message`. The rest are message mode's own replies.
"""

INSTANCE_PREFIX = "It’s instance number ".encode()
HEALTH_CHECK = "!HEALTH_CHECK"
"""What a health check sends, and expects back, by default."""

NOT_AVAILABLE = b"Server not available"
LINE_TOO_LONG = b"Error: line too long"
QUEUE_FULL = b"Error: server busy"
QUEUE_TIMEOUT = b"Error: queue timeout"
TOO_MANY_CONNECTIONS = b"Error: too many connections"
INVALID_MESSAGE = b"Invalid message"
"""An empty request, answered locally as the sample service answers it."""
LINE_BREAK = b"Error: line break inside a message"
"""A request holding a newline or CR, which a line backend would read as two."""
NEWLINE_ON_RAW = b"Error: newline on a raw connection"
MESSAGE_TOO_LONG = b"Error: message too long"
"""A request over RAW_BACKEND_MAX_MESSAGE bytes for a raw backend."""
BAD_REPLY = b"Error: invalid reply from server"
"""A raw backend's reply holding a newline, which a line client would read as two."""
STOPPING = b"Error: balancer stopping"
RAW_BACKEND_MAX_MESSAGE = 1024
"""The tutorial's original service reads with recv(1024): a longer message would be
read as two and answered twice."""
