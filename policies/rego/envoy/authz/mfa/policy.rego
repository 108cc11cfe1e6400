# METADATA
# title: staged - console writes will need multi-factor login
# description: |
#   Not enforced yet. The server leaves this package out of the enforced decision
#   and evaluates the full set beside it as the shadow decision, recorded with every
#   admin request: the dry-run result shows who would be refused once the annotation
#   below is removed. Tokens from a multi-factor login carry "mfa" in their `amr` claim.
# custom:
#   dry_run: true
package envoy.authz.mfa

import data.envoy.authz

missing if {
	authz.http_request.method != "GET"
	not "mfa" in object.get(authz.claims, "amr", [])
}
