package cloud

import (
	"io"
	"io/fs"
	"net/http"
	"strings"
	"testing"

	"imcloud/pipeline/config"
)

// TestDemoPage: with cloud.demo the WebSocket listener serves the demo
// page under /demo/ with its security headers, redirects /demo there,
// refuses other methods and stays away from /sub; without it, nothing.
func TestDemoPage(t *testing.T) {
	n := startNode(t, func(c *config.Cloud) { c.Demo = true })
	base := n.ws.URL
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	get := func(method, path string) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest(method, base+path, nil)
		res, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res, string(b)
	}
	res, body := get("GET", "/demo/")
	if res.StatusCode != 200 || !strings.Contains(body, `<script type="module" src="demo.js">`) {
		t.Fatalf("/demo/: %d %q", res.StatusCode, body[:min(len(body), 200)])
	}
	for h, want := range map[string]string{
		"Content-Security-Policy": "default-src 'self'",
		"X-Content-Type-Options":  "nosniff",
		"Referrer-Policy":         "no-referrer",
		"Content-Type":            "text/html",
	} {
		if !strings.Contains(res.Header.Get(h), want) {
			t.Errorf("%s: %q, want it to hold %q", h, res.Header.Get(h), want)
		}
	}
	if res, _ := get("GET", "/demo"); res.StatusCode != http.StatusMovedPermanently || res.Header.Get("Location") != "/demo/" {
		t.Errorf("/demo: %d to %q, want 301 to /demo/", res.StatusCode, res.Header.Get("Location"))
	}
	for _, f := range []string{"/demo/demo.js", "/demo/demo.css"} {
		if res, _ := get("GET", f); res.StatusCode != 200 {
			t.Errorf("%s: %d", f, res.StatusCode)
		}
	}
	// The bundle is there when make built it, a note that says how
	// otherwise: never a silent 404 page the module loader cannot read.
	res, body = get("GET", "/demo/imcloud-client.js")
	if _, err := fs.Stat(demoFiles, "demo/imcloud-client.js"); err == nil {
		if res.StatusCode != 200 || !strings.Contains(res.Header.Get("Content-Type"), "javascript") {
			t.Errorf("bundle: %d %s", res.StatusCode, res.Header.Get("Content-Type"))
		}
	} else if res.StatusCode != 404 || !strings.Contains(body, "make") {
		t.Errorf("missing bundle: %d %q, want 404 saying how to build it", res.StatusCode, body)
	}
	if res, _ := get("POST", "/demo/"); res.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /demo/: %d, want 405", res.StatusCode)
	}
	if res, _ := get("GET", "/demo/../sub"); res.StatusCode == http.StatusSwitchingProtocols {
		t.Error("a path under /demo reached /sub")
	}
	if res, _ := get("GET", "/demo/.gitignore"); res.StatusCode != 404 {
		t.Errorf("/demo/.gitignore: %d, want 404 (dot files are not embedded)", res.StatusCode)
	}

	off := startNode(t, func(*config.Cloud) {})
	res2, err := http.Get(off.ws.URL + "/demo/")
	if err != nil {
		t.Fatal(err)
	}
	res2.Body.Close()
	if res2.StatusCode != 404 {
		t.Errorf("without cloud.demo: /demo/ answered %d, want 404", res2.StatusCode)
	}
}
