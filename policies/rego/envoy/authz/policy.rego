# METADATA
# title: admin console
# description: |
#   The decision of Istio's CUSTOM provider `rego` (istio/admin.yaml), in OPA-Envoy's
#   shape: an object with `allowed`, and on allow the headers to add upstream, on
#   deny the status, body and headers the client gets.
#
#   Envoy's jwt_authn verifies the bearer token before ext_authz runs; this policy
#   only decodes it, takes the user from `sub` and looks their roles up in data.roles.
package envoy.authz

import data.envoy.authz.mfa
import data.roles

# No usable token: ask for one.
default allow := {
	"allowed": false,
	"http_status": 401,
	"body": "a bearer token is required for the admin console",
	"headers": {"www-authenticate": `Bearer realm="admin"`},
}

allow := {
	"allowed": true,
	# The application trusts these instead of parsing the token again.
	"headers": {
		"x-user": user,
		"x-roles": concat(",", sort(user_roles)),
	},
	"request_headers_to_remove": ["authorization"],
} if {
	permitted
} else := {
	"allowed": false,
	"http_status": 403,
	"body": json.marshal({"error": "forbidden", "user": user, "roles": sort(user_roles)}),
	"headers": {"content-type": "application/json"},
} if {
	user
}

permitted if {
	some role in user_roles
	some grant in roles.grants[role]
	http_request.method in grant.methods
	glob.match(grant.path, ["/"], request_path)
	not mfa.missing # staged (dry-run): undefined, so never true, in the enforced decision
}

user_roles := {role | some role in roles.bindings[user]}

user := claims.sub if is_string(claims.sub)

claims := payload if {
	[_, payload, _] := io.jwt.decode(bearer_token)
}

bearer_token := token if {
	header := http_request.headers.authorization
	startswith(header, "Bearer ")
	token := substring(header, count("Bearer "), -1)
}

http_request := input.attributes.request.http

# Grants match the path without its query string.
request_path := split(http_request.path, "?")[0]
