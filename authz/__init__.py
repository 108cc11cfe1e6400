"""Envoy ext_authz: request view, Istio AuthorizationPolicy and Rego engines, decisions (coming)."""
