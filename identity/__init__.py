"""SPIFFE identity: CA, SVIDs, bundle, registration entries, datastore and admin API."""
