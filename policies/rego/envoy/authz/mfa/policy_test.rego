# The staged package is tested like any other: tests see every package, staged or not.
package envoy.authz.mfa_test

import data.envoy.authz
import data.envoy.authz.mfa

token(claims) := io.jwt.encode_sign({"alg": "HS256", "typ": "JWT"}, claims, {"kty": "oct", "k": "c2VjcmV0"})

console_request(method, claims) := {"request": {"http": {
	"method": method,
	"path": "/admin/users/7",
	"headers": {"authorization": concat(" ", ["Bearer", token(claims)])},
}}}

test_write_without_mfa_is_flagged if {
	mfa.missing with input.attributes as console_request("DELETE", {"sub": "alice"})
}

test_write_with_mfa_passes if {
	not mfa.missing with input.attributes as console_request("DELETE", {"sub": "alice", "amr": ["pwd", "mfa"]})
}

test_reads_need_no_mfa if {
	not mfa.missing with input.attributes as console_request("GET", {"sub": "alice"})
}

test_staged_rule_refuses_admin_writes_without_mfa if {
	decision := authz.allow with input.attributes as console_request("DELETE", {"sub": "alice"})
	decision.http_status == 403
}
