package cloud

import (
	"embed"
	"io/fs"
	"net/http"
	"path"
)

// The demo page (cloud.demo; imcloud standalone turns it on): a static
// page at /demo on the WebSocket listener, same origin as /sub, that
// connects with the TypeScript SDK (sdk/js) and shows what arrives. The
// SDK's browser bundle, imcloud-client.js, is built into demo/ by
// `make sdk` before the binary (never committed); a binary built without
// Node serves the page with a note saying so instead of the bundle.
//
//go:embed demo
var demoFiles embed.FS

// demoCSP keeps the page to its own scripts and styles; it connects to
// this node's /sub and, to push, to the push API on another port.
const demoCSP = "default-src 'self'; connect-src 'self' ws: wss: http: https:; img-src 'self' data:; " +
	"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

func demoHandler() http.Handler {
	sub, err := fs.Sub(demoFiles, "demo")
	if err != nil {
		panic(err) // the embedded tree always has demo/
	}
	files := http.FileServerFS(sub)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		name := path.Clean("/" + r.URL.Path[len("/demo"):])
		h := w.Header()
		h.Set("Content-Security-Policy", demoCSP)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		if name == "/imcloud-client.js" {
			if _, err := fs.Stat(sub, "imcloud-client.js"); err != nil {
				h.Set("Content-Type", "text/javascript; charset=utf-8")
				w.WriteHeader(http.StatusNotFound)
				_, _ = w.Write([]byte(`throw new Error("this imcloud binary was built without the SDK bundle: build it with make (Node 20+ and npm), which runs make sdk first");` + "\n"))
				return
			}
		}
		if r.URL.Path == "/demo" {
			// Relative links resolve under /demo/; the fragment stays.
			http.Redirect(w, r, "/demo/", http.StatusMovedPermanently)
			return
		}
		r2 := r.Clone(r.Context())
		r2.URL.Path = name
		files.ServeHTTP(w, r2)
	})
}
