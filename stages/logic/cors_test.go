package logic

import (
	"net/http"
	"strings"
	"testing"
)

// TestCORS: pages of logic.cors_origins may call the keyed routes (the
// preflight answered before the key is checked, the call itself still
// needing it); other origins learn nothing and are refused (no cross-site
// push, also without keys: TestCORSKeyless); /im/nodes/weighted needs no
// key and answers any page.
func TestCORS(t *testing.T) {
	const key = "0123456789abcdef"
	a := newAPI(t, apiOptions{apiKeys: []string{key}, corsOrigins: []string{"http://demo.test:3102"}})
	send := func(method, path, origin string, h map[string]string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(method, a.url+path, strings.NewReader("hi"))
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		for k, v := range h {
			req.Header.Set(k, v)
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res
	}
	preflight := map[string]string{"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
	tests := []struct {
		name, method, path, origin string
		headers                    map[string]string
		status                     int
		allowOrigin                string
		allowMethods               string
	}{
		{"preflight from a listed origin", "OPTIONS", "/im/push/mids?operation=1000&mids=1", "http://demo.test:3102", preflight, 204, "http://demo.test:3102", "POST"},
		{"preflight from another origin", "OPTIONS", "/im/push/mids", "http://evil.test", preflight, 204, "", ""},
		{"push from a listed origin with the key", "POST", "/im/push/mids?operation=1000&mids=1", "http://demo.test:3102", map[string]string{"Authorization": "Bearer " + key}, 200, "http://demo.test:3102", ""},
		{"push from a listed origin without the key", "POST", "/im/push/mids?operation=1000&mids=1", "http://demo.test:3102", nil, 401, "http://demo.test:3102", ""},
		{"push from another origin, even with the key", "POST", "/im/push/mids?operation=1000&mids=1", "http://evil.test", map[string]string{"Authorization": "Bearer " + key}, 403, "", ""},
		{"push from another origin without a preflight", "POST", "/im/push/all?operation=1000", "http://evil.test", map[string]string{"Content-Type": "text/plain"}, 403, "", ""},
		{"stats from another origin", "GET", "/im/online/total", "http://evil.test", map[string]string{"Authorization": "Bearer " + key}, 403, "", ""},
		{"nodes without a key, any origin", "GET", "/im/nodes/weighted?platform=web", "http://anything.test", nil, 200, "*", ""},
		{"goim nodes without a key or origin", "GET", "/goim/nodes/weighted?platform=web", "", nil, 200, "*", ""},
		{"nodes preflight", "OPTIONS", "/im/nodes/weighted", "http://anything.test", map[string]string{"Access-Control-Request-Method": "GET"}, 204, "*", "GET, HEAD"},
		{"other stats still need the key", "GET", "/im/online/total", "http://demo.test:3102", nil, 401, "http://demo.test:3102", ""},
		{"OPTIONS without Origin is no preflight", "OPTIONS", "/im/push/mids", "", nil, 401, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := send(tt.method, tt.path, tt.origin, tt.headers)
			if res.StatusCode != tt.status {
				t.Fatalf("status %d, want %d", res.StatusCode, tt.status)
			}
			if got := res.Header.Get("Access-Control-Allow-Origin"); got != tt.allowOrigin {
				t.Errorf("Access-Control-Allow-Origin %q, want %q", got, tt.allowOrigin)
			}
			if got := res.Header.Get("Access-Control-Allow-Methods"); got != tt.allowMethods {
				t.Errorf("Access-Control-Allow-Methods %q, want %q", got, tt.allowMethods)
			}
			if tt.allowOrigin != "" && tt.allowOrigin != "*" && !strings.Contains(res.Header.Get("Vary"), "Origin") {
				t.Error("no Vary: Origin on an origin-specific answer")
			}
		})
	}
}

// TestCORSKeyless: a keyless push API (standalone --anonymous, on
// loopback) takes pushes from tools, which send no Origin, but not from a
// web page of another site, which any site a developer visits could send.
func TestCORSKeyless(t *testing.T) {
	a := newAPI(t, apiOptions{})
	for _, tt := range []struct {
		origin string
		status int
	}{{"", 200}, {"https://evil.example", 403}, {"null", 403}} {
		req, _ := http.NewRequest("POST", a.url+"/im/push/all?operation=1000", strings.NewReader("csrf"))
		req.Header.Set("Content-Type", "text/plain")
		if tt.origin != "" {
			req.Header.Set("Origin", tt.origin)
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != tt.status {
			t.Errorf("Origin %q: %d, want %d", tt.origin, res.StatusCode, tt.status)
		}
	}
}
