"""meshward command line, configuration and process wiring (no domain logic)."""

import os

# gRPC's C core reads this once, when grpc is first imported; without it, a failed TLS
# handshake is logged to stderr on top of meshward's own one-line error.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
