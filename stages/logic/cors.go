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
//     logic.cors_origins may call it from a browser: a request with
//     another Origin is refused (403) before anything runs. A preflight
//     (OPTIONS with Access-Control-Request-Method) is answered before the
//     key is checked — a browser never sends credentials on one — and
//     says nothing to an origin not listed.

// publicRoutes are served without an API key: where a client connects.
var publicRoutes = map[string]bool{"/im/nodes/weighted": true, "/goim/nodes/weighted": true, "/openapi.json": true}

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
	public := publicRoutes[r.URL.Path]
	h := w.Header()
	if public {
		// The same answer for every origin, and for none: a cache in
		// front may keep it whoever asked first.
		h.Set("Access-Control-Allow-Origin", "*")
	}
	if origin == "" {
		return false
	}
	h.Add("Vary", "Origin")
	switch {
	case public:
	case allowedOrigin(st.access.Load().cors, origin):
		h.Set("Access-Control-Allow-Origin", origin)
		h.Set("Access-Control-Expose-Headers", corsExposeHeaders)
	default:
		if r.Method == http.MethodOptions {
			// Not an origin of ours: the browser refuses the call.
			w.WriteHeader(http.StatusNoContent)
			return true
		}
		// A page of another site, calling without a preflight (a simple
		// POST, mode no-cors): refused before anything runs. With API
		// keys it could not authenticate anyway; without them (a keyless
		// push API on loopback) any site a developer visits could push
		// to every client. Callers that are not browsers send no Origin.
		writeError(w, http.StatusForbidden, "origin "+truncate(origin)+" may not call this API from a browser; list it in logic.cors_origins")
		return true
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

// allowedOrigin reports whether origin is in cors, or cors allows any.
func allowedOrigin(cors []string, origin string) bool {
	return slices.Contains(cors, "*") || slices.Contains(cors, origin)
}
