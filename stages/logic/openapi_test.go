package logic

import (
	"bytes"
	"io"
	"net/http"
	"slices"
	"sync"
	"testing"

	"imcloud/stages/logic/openapitest"
)

// checker validates the API tests' exchanges against openapi.yaml.
var checker = sync.OnceValues(func() (*openapitest.Checker, error) { return openapitest.New(openAPIJSON) })

func checkOpenAPI(t *testing.T, method, url, contentType, body string, header http.Header, status int, respHeader http.Header, respBody []byte) {
	t.Helper()
	c, err := checker()
	if err != nil {
		t.Errorf("openapi.yaml: %v", err)
		return
	}
	c.Check(t, method, url, contentType, body, header, status, respHeader, respBody)
}

func TestOpenAPIDocumentIsValid(t *testing.T) {
	if _, err := checker(); err != nil {
		t.Fatalf("openapi.yaml: %v", err)
	}
	a := newAPI(t, apiOptions{})
	res, err := http.Get(a.url + "/openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode != 200 || !bytes.Equal(b, openAPIJSON) || res.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("GET /openapi.json without a key: %d %s", res.StatusCode, res.Header.Get("Content-Type"))
	}
}

// TestOpenAPIMatchesTheRoutes: every route logic serves is in the
// document with its methods, and every documented route is served.
func TestOpenAPIMatchesTheRoutes(t *testing.T) {
	c, err := checker()
	if err != nil {
		t.Fatal(err)
	}
	doc := c.Doc()
	a := newAPI(t, apiOptions{})
	served := map[string][]string{}
	for path, methods := range a.st.Routes() {
		for _, m := range methods {
			if m != http.MethodHead {
				served[path] = append(served[path], m)
			}
		}
		slices.Sort(served[path])
	}
	documented := map[string][]string{}
	for path, item := range doc.Paths.Map() {
		for m := range item.Operations() {
			documented[path] = append(documented[path], m)
		}
		slices.Sort(documented[path])
	}
	for path, methods := range served {
		if !slices.Equal(documented[path], methods) {
			t.Errorf("%s: served %v, documented %v", path, methods, documented[path])
		}
	}
	for path, methods := range documented {
		if _, ok := served[path]; !ok {
			t.Errorf("%s %v: documented, not served", path, methods)
		}
	}
}
