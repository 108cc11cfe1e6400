"""SPIFFE identity: CA, SVIDs, bundle, registration entries, datastore and admin API."""

import warnings

# py-spiffe 0.3 names `dsa.DSAPublicKey` in a type union at import; cryptography 51
# deprecates DSA and warns on that name. meshward never accepts DSA keys, so the warning
# would only be noise on every command's stderr.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"spiffe\.")
