package logic

import (
	"net/http"
	"slices"
	"strings"
)

// Browser access to the HTTP API (issue 13: the demo page pushes from the
// cloud node's origin, the SDK picks a node from /im/nodes/weighted).
//
// Two kinds of route:
//   - the public ones (nodesPublic) need no key and say nothing a client
//     does not need to connect: any origin may read them;
//   - every other route needs the API key, and only the pages of
//     logic.cors_origins may call it from a browser. A preflight
//     (OPTIONS with Access-Control-Request-Method) is answered before the
//     key is checked — a browser never sends credentials on one — and
//     says nothing to an origin not listed.

// publicRoutes are served without an API key: where a client connects.
var publicRoutes = map[string]bool{"/im/nodes/weighted": true, "/goim/nodes/weighted": true}

// corsAllowHeaders are the request headers a page may send.
const corsAllowHeaders = "Authorization, Content-Type, Idempotency-Key, X-Request-ID"

// corsExposeHeaders are the reply headers a page may read.
const corsExposeHeaders = "Retry-After, Idempotent-Replayed, X-Request-ID"

// corsMaxAge: a page asks again after 10 minutes at most.
const corsMaxAge = "600"

// cors sets the CORS headers of r's reply and answers a preflight; it
// reports whether it did (the request is then done).
func (st *Stage) cors(w http.ResponseWriter, r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return false
	}
	h := w.Header()
	h.Add("Vary", "Origin")
	public := publicRoutes[r.URL.Path]
	switch {
	case public:
		h.Set("Access-Control-Allow-Origin", "*")
	case slices.Contains(st.cfg.CORSOrigins, "*") || slices.Contains(st.cfg.CORSOrigins, origin):
		h.Set("Access-Control-Allow-Origin", origin)
		h.Set("Access-Control-Expose-Headers", corsExposeHeaders)
	default:
		if r.Method == http.MethodOptions {
			// Not an origin of ours: the browser refuses the call.
			w.WriteHeader(http.StatusNoContent)
			return true
		}
		return false
	}
	if r.Method != http.MethodOptions || r.Header.Get("Access-Control-Request-Method") == "" {
		return false
	}
	methods := "GET, HEAD"
	if !public && strings.Contains(r.URL.Path, "/push/") {
		methods = "POST"
	}
	h.Set("Access-Control-Allow-Methods", methods)
	if !public {
		h.Set("Access-Control-Allow-Headers", corsAllowHeaders)
	}
	h.Set("Access-Control-Max-Age", corsMaxAge)
	w.WriteHeader(http.StatusNoContent)
	return true
}
