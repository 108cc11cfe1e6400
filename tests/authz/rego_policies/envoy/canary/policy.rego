# METADATA
# title: a stricter rule set, observed before it is enforced
# custom:
#   dry_run: true
package envoy.canary

import data.envoy.authz

allow if {
	authz.permitted
	authz.http_request.method == "GET"
}
