package logic

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/pipeline/config"
)

// TestMalformedRequestsAreRefused: what the API cannot read unambiguously
// is refused, naming what is wrong, instead of one reading silently
// winning. On main: a repeated JSON member let the last win (pushing to
// mid 6, not 5); a Content-Type with a bad parameter sent the parameter
// object to mid 5 as a raw message; a ';' or more than 10,000 query
// parameters dropped pairs or the whole query without a word; a JSON body
// over its limit was blamed on msg; a wrong method was 404.
func TestMalformedRequestsAreRefused(t *testing.T) {
	a := newAPI(t, apiOptions{})
	a.online(5, "k5")
	a.online(6, "k6")
	manyKeys := "/im/push/keys?operation=1000" + strings.Repeat("&keys=k5", 10_000)
	bigJSON := `{"operation":1000,"keys":["k5"],"msg":"x"` + strings.Repeat(" ", int(jsonBodyLimit(config.Default().Logic.MaxMessageBytes))) + `}`
	tests := []struct {
		name, method, path, contentType, body string
		status                                int
		prefix                                string // of the reply's message
		allow                                 string // the Allow header of a 405
	}{
		{"JSON mids twice", "POST", "/im/push/mids", PushJSONType, `{"operation":1000,"mids":[5],"mids":[6],"msg":"x"}`, 400, "mids: given twice", ""},
		{"JSON msg twice", "POST", "/im/push/mids", PushJSONType, `{"operation":1000,"mids":[5],"msg":"x","msg":"y"}`, 400, "msg: given twice", ""},
		{"JSON operation twice", "POST", "/im/push/mids", PushJSONType, `{"operation":1000,"operation":1001,"mids":[5],"msg":"x"}`, 400, "operation: given twice", ""},
		{"JSON member twice, once escaped", "POST", "/im/push/mids", PushJSONType, `{"operation":1000,"mids":[5],"m\u0069ds":[6],"msg":"x"}`, 400, "mids: given twice", ""},
		{"JSON trailing object", "POST", "/im/push/mids", PushJSONType, `{"operation":1000,"mids":[5],"msg":"x"}{}`, 400, "body: want one JSON object", ""},
		{"JSON not an object", "POST", "/im/push/mids", PushJSONType, `[1]`, 400, "body: want a JSON object", ""},
		{"JSON object cut short", "POST", "/im/push/mids", PushJSONType, `{"operation":1000,"mids":[5]`, 400, "body: want a JSON object", ""},
		{"JSON body over its limit, msg tiny", "POST", "/im/push/keys", PushJSONType, bigJSON, 413, fmt.Sprintf("body: JSON parameter body larger than %d bytes", jsonBodyLimit(config.Default().Logic.MaxMessageBytes)), ""},
		{"raw message over its limit", "POST", "/im/push/keys?operation=1000&keys=k5", "", strings.Repeat("x", config.Default().Logic.MaxMessageBytes+1), 413, fmt.Sprintf("msg: larger than %d bytes", config.Default().Logic.MaxMessageBytes), ""},
		{"Content-Type with a bad parameter", "POST", "/im/push/mids?operation=1000&mids=5", PushJSONType + "; charset", `{"operation":1000,"mids":[6],"msg":"x"}`, 400, "Content-Type: ", ""},
		{"Content-Type that is no media type", "POST", "/im/push/mids?operation=1000&mids=5", "/", "x", 400, "Content-Type: ", ""},
		{"query with ';'", "POST", "/im/push/keys?operation=1000&keys=k5&keys=k6;x", "", "x", 400, "query: ", ""},
		{"query with over 10,000 parameters", "POST", manyKeys, "", "x", 400, "query: ", ""},
		{"query with a bad escape", "POST", "/im/push/keys?operation=1000&keys=%zz", "", "x", 400, "query: ", ""},
		{"stats query with ';'", "GET", "/im/online/top?type=live;x", "", "", 400, "query: ", ""},
		{"goim stats query with ';'", "GET", "/goim/nodes/weighted?platform=web;x", "", "", 400, "query: ", ""},
		{"GET a push route", "GET", "/im/push/all", "", "", 405, "method GET not allowed", "POST"},
		{"DELETE a goim push route", "DELETE", "/goim/push/keys", "", "", 405, "method DELETE not allowed", "POST"},
		{"POST a stats route", "POST", "/im/online/top?type=live", "", "", 405, "method POST not allowed", "GET, HEAD"},
		{"no such path", "GET", "/im/push/nope", "", "", 404, "no such route", ""},
		// Under /goim/ the body is the message, whatever it is labelled.
		{"goim: Content-Type with a bad parameter is a message", "POST", "/goim/push/mids?operation=1000&mids=5", PushJSONType + "; charset", "x", 200, "", ""},
		{"a Content-Type with parameters parses", "POST", "/im/push/mids", PushJSONType + "; charset=utf-8", `{"operation":1000,"mids":[5],"msg":"x"}`, 200, "ok", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := a.do(tt.method, tt.path, tt.contentType, tt.body, nil)
			if r.status != tt.status || r.Code != map[bool]int{true: 0, false: -tt.status}[tt.status == 200] || !strings.HasPrefix(deref(r.Msg), tt.prefix) {
				t.Fatalf("status %d code %d message %q; want %d with a message starting %q", r.status, r.Code, deref(r.Msg), tt.status, tt.prefix)
			}
			if got := r.header.Get("Allow"); got != tt.allow {
				t.Fatalf("Allow %q, want %q", got, tt.allow)
			}
		})
	}
	// Only the two accepted requests published, both to mid 5.
	got := a.published()
	if len(got) != 2 {
		t.Fatalf("%d messages published, want 2", len(got))
	}
	for _, pm := range got {
		if len(pm.Keys) != 1 || pm.Keys[0] != "k5" || string(pm.Msg) != "x" {
			t.Fatalf("published %v, want \"x\" to k5", pm)
		}
	}
}

// TestReplayInTheShapeOfTheRetrysAPI: an Idempotency-Key first used on one
// API and retried on the other is answered as the retry's API answers.
// On main the stored envelope was replayed: a goim retry got "ok".
func TestReplayInTheShapeOfTheRetrysAPI(t *testing.T) {
	a := newAPI(t, apiOptions{})
	for _, tt := range []struct{ key, first, retry, want string }{
		{"im-then-goim", "/im/", "/goim/", ""},
		{"goim-then-im", "/goim/", "/im/", "ok"},
	} {
		h := http.Header{"Idempotency-Key": {tt.key}}
		first := a.do("POST", tt.first+"push/all?operation=1000", "", "x", h)
		retry := a.do("POST", tt.retry+"push/all?operation=1000", "", "x", h)
		if first.status != 200 || retry.status != 200 || retry.header.Get("Idempotent-Replayed") != "true" {
			t.Fatalf("%s: statuses %d, %d, replayed %q; want 200s, the second replayed", tt.key, first.status, retry.status, retry.header.Get("Idempotent-Replayed"))
		}
		if deref(retry.Msg) != tt.want || string(retry.Data) != string(first.Data) {
			t.Fatalf("%s: retry answered message %q data %s; want %q and the first's data %s", tt.key, deref(retry.Msg), retry.Data, tt.want, first.Data)
		}
	}
	if n := a.pub.count(); n != 2 {
		t.Fatalf("%d published, want 2 (one per key)", n)
	}
}

// ctxPublisher holds a publish until its message's context ends, the way
// a broker publish waits for a confirm that does not come.
type ctxPublisher struct{ calls chan struct{} }

func (p *ctxPublisher) Publish(_ string, msgs ...*message.Message) error {
	p.calls <- struct{}{}
	<-msgs[0].Context().Done()
	return msgs[0].Context().Err()
}

func (p *ctxPublisher) Close() error { return nil }

// TestPushIsBoundedBelowItsReservation: net/http does not cancel a
// handler at WriteTimeout, so on main a publish stuck on the broker ran
// on past idempotency.InFlightTTL, when a retry could reserve the key and
// publish again. Now the push gives up inside write_timeout, answers 503
// and frees its key.
func TestPushIsBoundedBelowItsReservation(t *testing.T) {
	const writeTimeout = 2 * time.Second
	pub := &ctxPublisher{calls: make(chan struct{}, 4)}
	a := newAPI(t, apiOptions{pub: pub, writeTimeout: writeTimeout})
	key := http.Header{"Idempotency-Key": {"stuck"}}
	// A client that gives up, so that a push that is not bounded fails
	// the test rather than hanging it.
	cl := &http.Client{Timeout: 3 * writeTimeout}
	for i := range 2 {
		req, _ := http.NewRequest("POST", a.url+"/im/push/all?operation=1000", strings.NewReader("x"))
		req.Header = key.Clone()
		start := time.Now()
		resp, err := cl.Do(req)
		if err != nil {
			t.Fatalf("attempt %d: no answer after %v: %v", i, time.Since(start), err)
		}
		resp.Body.Close()
		if took := time.Since(start); resp.StatusCode != 503 || took >= writeTimeout {
			t.Fatalf("attempt %d: status %d after %v; want 503 within write_timeout %v (a retry finding the key in flight is 409)", i, resp.StatusCode, took, writeTimeout)
		}
	}
	if n := len(pub.calls); n != 2 {
		t.Fatalf("%d publishes attempted, want 2", n)
	}
}

// failOncePublisher records every publish and fails the first, as a
// broker that took a message and then lost the connection before its
// confirm.
type failOncePublisher struct {
	recordingPublisher
	once sync.Once
}

func (p *failOncePublisher) Publish(topic string, msgs ...*message.Message) error {
	_ = p.recordingPublisher.Publish(topic, msgs...)
	err := error(nil)
	p.once.Do(func() { err = errors.New("connection lost before confirm") })
	return err
}

// TestRetryWithOtherContentGetsAnotherMessageID: after a failed push
// freed its key, a retry with other content must not share the first
// attempt's message id, or job's dedupe drops it as the (partly
// published) first one. On main the id came from the key alone.
func TestRetryWithOtherContentGetsAnotherMessageID(t *testing.T) {
	pub := &failOncePublisher{}
	a := newAPI(t, apiOptions{pub: pub})
	key := http.Header{"Idempotency-Key": {"order-1"}}
	const path = "/im/push/room?operation=1000&type=live&room=1"
	if r := a.do("POST", path, "", "first", key); r.status != 503 {
		t.Fatalf("first attempt: %d, want 503", r.status)
	}
	if r := a.do("POST", path, "", "second", key); r.status != 200 {
		t.Fatalf("retry with other content: %d %q", r.status, deref(r.Msg))
	}
	if r := a.do("POST", "/goim/push/room?operation=1000&type=live&room=1", "", "second", key); r.status != 200 || r.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("the same retry again: %d replayed %q", r.status, r.header.Get("Idempotent-Replayed"))
	}
	pub.mu.Lock()
	defer pub.mu.Unlock()
	if len(pub.msgs) != 2 || pub.msgs[0].UUID == pub.msgs[1].UUID {
		t.Fatalf("published %d messages; the two contents share id %q", len(pub.msgs), pub.msgs[0].UUID)
	}
	// The same content under the same key keeps its id (the replay above
	// did not publish), so that dedupe still drops a retried duplicate.
	if id, again := MessageID("k", "push/room", "f"), MessageID("k", "push/room", "f"); id != again || id == MessageID("k", "push/room", "g") {
		t.Fatal("MessageID is not a function of key, route and fingerprint")
	}
}
