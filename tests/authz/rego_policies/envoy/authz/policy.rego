# METADATA
# title: ext_authz decision, OPA-Envoy style
# description: RBAC by principal, method and path from data.roles, behind a JWT check.
package envoy.authz

import data.roles

http_request := input.attributes.request.http

principal := input.attributes.source.principal

default allow := {
	"allowed": false,
	"http_status": 403,
	"body": "RBAC: access denied",
	"headers": {"x-denied-by": "rego"},
}

# Envoy's jwt_authn has verified the token; the policy only reads its claims.
allow := {
	"allowed": false,
	"http_status": 401,
	"body": "a bearer token from issuer.example.org is required",
	"headers": {"www-authenticate": `Bearer realm="mesh"`},
} if {
	not valid_token
} else := {
	"allowed": true,
	"headers": {
		"x-user": claims.sub,
		"x-roles": concat(",", roles.bindings[principal]),
	},
	"request_headers_to_remove": ["authorization"],
	"response_headers_to_add": {"x-policy": "rbac"},
	"query_parameters_to_set": {"tenant": claims.tenant},
	"query_parameters_to_remove": ["debug"],
	"dynamic_metadata": {"subject": claims.sub, "roles": roles.bindings[principal]},
} if {
	permitted
}

permitted if {
	some role in roles.bindings[principal]
	some grant in roles.grants[role]
	grant.method == http_request.method
	glob.match(grant.path, ["/"], http_request.path)
}

valid_token if claims.iss == "https://issuer.example.org"

claims := payload if {
	[_, payload, _] := io.jwt.decode(bearer_token)
}

bearer_token := token if {
	header := http_request.headers.authorization
	startswith(header, "Bearer ")
	token := substring(header, count("Bearer "), -1)
}
