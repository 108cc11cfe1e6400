# Unit tests of the admin console policy. `meshward policy test` runs every test_*
# rule, as `opa test` does: a test passes when it is true.
package envoy.authz_test

import data.envoy.authz

# The policy only decodes tokens (Envoy's jwt_authn verifies them), so any key will do.
# Tests see the staged package envoy.authz.mfa too, so these tokens come from a
# multi-factor login; envoy/authz/mfa/policy_test.rego covers the ones that do not.
token_for(sub) := io.jwt.encode_sign(
	{"alg": "HS256", "typ": "JWT"},
	{"sub": sub, "amr": ["pwd", "mfa"]},
	{"kty": "oct", "k": "c2VjcmV0"},
)

# input.attributes as OPA-Envoy builds it, reduced to what the policy reads.
request(method, path, sub) := {"request": {"http": {
	"method": method,
	"path": path,
	"headers": {"authorization": concat(" ", ["Bearer", token_for(sub)])},
}}}

test_admin_may_delete_users if {
	decision := authz.allow with input.attributes as request("DELETE", "/admin/users/7", "alice")
	decision.allowed
	decision.headers == {"x-user": "alice", "x-roles": "admin"}
	decision.request_headers_to_remove == ["authorization"]
}

test_support_may_read_users if {
	authz.allow.allowed with input.attributes as request("GET", "/admin/users?page=2", "bob")
}

test_support_may_not_delete_users if {
	decision := authz.allow with input.attributes as request("DELETE", "/admin/users/7", "bob")
	not decision.allowed
	decision.http_status == 403
	json.unmarshal(decision.body) == {"error": "forbidden", "user": "bob", "roles": ["support"]}
}

test_user_without_roles_is_forbidden if {
	decision := authz.allow with input.attributes as request("GET", "/admin/users", "mallory")
	decision.http_status == 403
}

test_no_token_is_unauthorized if {
	decision := authz.allow with input.attributes as {"request": {"http": {"method": "GET", "path": "/admin", "headers": {}}}}
	decision.http_status == 401
	decision.headers["www-authenticate"] == `Bearer realm="admin"`
}

test_roles_come_from_data if {
	decision := authz.allow
		with input.attributes as request("DELETE", "/admin/users/7", "bob")
		with data.roles.bindings as {"bob": ["admin"]}
	decision.allowed
}
