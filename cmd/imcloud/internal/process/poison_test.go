package process

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/adapters/gochannel"
	"imcloud/pipeline"
)

// TestPoisonEndpoints: what the admin listener's poison endpoints refuse,
// and what they answer, over the embedded broker's kept topic.
func TestPoisonEndpoints(t *testing.T) {
	ps := gochannel.New(watermill.NopLogger{}, 100, nil)
	defer ps.Close()
	ps.Keep("poison", 10, nil)
	admin, err := ps.PoisonAdmin("poison", pipeline.ReplayTargets{"push"})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	(&poisonHandler{admin: admin, topic: "poison", logger: slog.New(slog.DiscardHandler)}).register(mux)
	publish := func(ids ...string) {
		for _, id := range ids {
			if err := ps.Publish("poison", message.NewMessage(id, []byte("body-"+id))); err != nil {
				t.Fatal(err)
			}
		}
	}
	publish("a", "b", "c")
	// Two messages whose publisher gave both the id "dup": keys 4 and 5.
	for range 2 {
		m := message.NewMessage(watermill.NewUUID(), []byte("dup"))
		m.Metadata.Set(pipeline.MetaMessageID, "dup")
		if err := ps.Publish("poison", m); err != nil {
			t.Fatal(err)
		}
	}
	big := "id=" + strings.Repeat("x", poisonMaxFormBody)
	tests := []struct {
		name, method, target, body string
		header                     map[string]string
		wantCode                   int
		wantBody                   string // a substring of the answer
	}{
		{"list", "GET", "/poison", "", nil, 200, `"key":"1","id":"a","poisoned_at":`},
		{"list a page", "GET", "/poison?limit=2", "", nil, 200, `"id":"b","poisoned_at":`},
		{"a page says more remain", "GET", "/poison?limit=2", "", nil, 200, `"more":true`},
		{"list after a key", "GET", "/poison?after=3&limit=2", "", nil, 200, `"key":"4","id":"dup"`},
		{"the last page says none remain", "GET", "/poison?after=3&limit=2", "", nil, 200, `"more":false`},
		{"list with a bad limit", "GET", "/poison?limit=0", "", nil, 400, "limit"},
		{"list with too big a limit", "GET", "/poison?limit=10001", "", nil, 400, "limit"},
		{"list after a bad key", "GET", "/poison?after=x", "", nil, 400, "not a key"},
		{"purge an id naming two", "POST", "/poison/purge?id=dup", "", nil, 400, `"dup" has keys 4, 5`},
		{"purge by key", "POST", "/poison/purge?key=5", "", nil, 200, `{"action":"purge","count":1}`},
		{"purge the id now naming one", "POST", "/poison/purge?id=dup", "", nil, 200, `{"action":"purge","count":1}`},
		{"purge with keys and ids", "POST", "/poison/purge?key=1&id=a", "", nil, 400, "one of them"},
		{"list leaves out the payload", "GET", "/poison", "", nil, 200, `"payload_bytes":6}`},
		{"list with the payload", "GET", "/poison?payload=true", "", nil, 200, `"payload":"Ym9keS1h"`},
		{"list with a bad payload flag", "GET", "/poison?payload=maybe", "", nil, 400, "payload"},
		{"list by POST", "POST", "/poison", "", nil, 405, "GET"},
		{"replay by GET", "GET", "/poison/replay?all=true", "", nil, 405, "POST"},
		{"purge by PUT", "PUT", "/poison/purge?all=true", "", nil, 405, "POST"},
		{"purge naming nothing", "POST", "/poison/purge", "", nil, 400, "id (repeatable) or all=true"},
		{"purge with all=false only", "POST", "/poison/purge?all=false", "", nil, 400, "id (repeatable) or all=true"},
		{"purge with ids and all", "POST", "/poison/purge?all=true&id=a", "", nil, 400, "one of them"},
		{"purge with a bad all", "POST", "/poison/purge?all=yes-please", "", nil, 400, "all="},
		{"purge from a web page", "POST", "/poison/purge?all=true", "", map[string]string{"Origin": "http://evil.example"}, 403, "web page"},
		{"purge with too big a body", "POST", "/poison/purge", big, map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, 413, "too large"},
		{"purge an unknown id", "POST", "/poison/purge?id=zzz", "", nil, 200, `"count":0`},
		{"purge ids in the form", "POST", "/poison/purge", url.Values{"id": {"a", "b"}}.Encode(), map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, 200, `{"action":"purge","count":2}`},
		{"replay with nothing subscribed", "POST", "/poison/replay?all=true", "", nil, 500, `"count":0,"error":`},
		{"still listed after a refused replay", "GET", "/poison", "", nil, 200, `"id":"c"`},
		{"purge all", "POST", "/poison/purge?all=true", "", nil, 200, `"count":1`},
		{"list empty", "GET", "/poison", "", nil, 200, `"messages":[]`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := httptest.NewRequest(tt.method, tt.target, strings.NewReader(tt.body))
			for k, v := range tt.header {
				req.Header.Set(k, v)
			}
			rec := httptest.NewRecorder()
			mux.ServeHTTP(rec, req)
			if rec.Code != tt.wantCode || !strings.Contains(rec.Body.String(), tt.wantBody) {
				t.Fatalf("%s %s: %d %q; want %d with %q", tt.method, tt.target, rec.Code, rec.Body.String(), tt.wantCode, tt.wantBody)
			}
			if rec.Code == 200 && !json.Valid(rec.Body.Bytes()) {
				t.Fatalf("answer is not JSON: %q", rec.Body.String())
			}
		})
	}
}

// TestNoPoisonOnSharedBroker: a process on a shared broker says where its
// poison topic is reached instead.
func TestNoPoisonOnSharedBroker(t *testing.T) {
	mux := http.NewServeMux()
	registerNoPoison(mux, "nats")
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest("GET", "/poison", nil))
	if rec.Code != http.StatusNotFound || !strings.Contains(rec.Body.String(), "without --admin") {
		t.Fatalf("GET /poison on a shared broker: %d %q", rec.Code, rec.Body.String())
	}
}
