package envoy.authz_test

# Test modules are not served. This one is Rego v0 on purpose: were it loaded, the
# policy set would be refused.
test_denied_without_token {
	not data.envoy.authz.allow.allowed with input as {}
}
