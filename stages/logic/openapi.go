package logic

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"net/http"

	"go.yaml.in/yaml/v3"
)

// openAPIYAML is the HTTP API's OpenAPI 3.1 document, written by hand
// beside the routes; TestOpenAPIMatchesTheRoutes keeps the two equal and
// the API tests validate their requests and replies against it.
//
//go:embed openapi.yaml
var openAPIYAML []byte

// openAPIJSON is the document as JSON, made once: GET /openapi.json.
var openAPIJSON = func() []byte {
	var doc any
	if err := yaml.Unmarshal(openAPIYAML, &doc); err != nil {
		panic(fmt.Sprintf("openapi.yaml: %v", err)) // embedded, and tested
	}
	b, err := json.Marshal(doc)
	if err != nil {
		panic(fmt.Sprintf("openapi.yaml as JSON: %v", err))
	}
	return b
}()

func serveOpenAPI(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "public, max-age=300")
	_, _ = w.Write(openAPIJSON)
}

// OpenAPI returns the HTTP API's OpenAPI document, as /openapi.json
// serves it (shared: do not modify).
func OpenAPI() []byte { return openAPIJSON }

// Routes returns the paths the HTTP API serves and their methods.
func (st *Stage) Routes() map[string][]string { return st.routes }
