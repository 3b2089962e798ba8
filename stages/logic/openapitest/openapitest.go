// Package openapitest checks HTTP exchanges with logic's API against its
// OpenAPI document (kin-openapi), for the tests of logic and of the
// whole process.
package openapitest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"
)

// Checker validates exchanges against one document.
type Checker struct {
	doc    *openapi3.T
	router routers.Router
}

// New loads and validates doc (logic.OpenAPI()).
func New(doc []byte) (*Checker, error) {
	d, err := openapi3.NewLoader().LoadFromData(doc)
	if err != nil {
		return nil, fmt.Errorf("load the OpenAPI document: %w", err)
	}
	if err := d.Validate(context.Background()); err != nil {
		return nil, fmt.Errorf("validate the OpenAPI document: %w", err)
	}
	r, err := openapi3.NewLoader().LoadFromData(doc)
	if err != nil {
		return nil, err
	}
	// The document's server is an example: match any host.
	r.Servers = nil
	router, err := legacy.NewRouter(r)
	if err != nil {
		return nil, fmt.Errorf("route the OpenAPI document: %w", err)
	}
	return &Checker{doc: d, router: router}, nil
}

// Doc is the loaded document.
func (c *Checker) Doc() *openapi3.T { return c.doc }

// Check validates one exchange with the API against the
// document: the reply always (every status a route answers is
// documented, with its shape), the request when it was accepted (what
// the server takes, the document allows).
func (c *Checker) Check(t *testing.T, method, url, contentType, body string, header http.Header, status int, respHeader http.Header, respBody []byte) {
	t.Helper()
	// Errorf, never Fatalf: tests call this from their own goroutines.
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Errorf("%s %s: %v", method, url, err)
		return
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	route, params, err := c.router.FindRoute(req)
	if err != nil {
		if status == http.StatusNotFound || status == http.StatusMethodNotAllowed {
			return // not a route: nothing to document
		}
		t.Errorf("%s %s answered %d but is not in openapi.yaml: %v", method, url, status, err)
		return
	}
	in := &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route,
		Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc, ExcludeRequestBody: true}}
	if status < 300 {
		if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
			t.Errorf("%s %s was accepted (%d) but openapi.yaml refuses it: %v", method, url, status, err)
		}
	}
	out := &openapi3filter.ResponseValidationInput{RequestValidationInput: in, Status: status, Header: respHeader,
		Body: io.NopCloser(bytes.NewReader(respBody)), Options: &openapi3filter.Options{IncludeResponseStatus: true}}
	if err := openapi3filter.ValidateResponse(context.Background(), out); err != nil {
		t.Errorf("%s %s: its %d reply does not match openapi.yaml: %v\n%s", method, url, status, err, respBody)
	}
}
