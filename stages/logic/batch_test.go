package logic

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/proto/pb"
)

// batchResult is one result of a batch reply.
type batchResult struct {
	Index       int        `json:"index"`
	Status      int        `json:"status"`
	Error       string     `json:"error"`
	Replayed    bool       `json:"replayed"`
	MsgID       string     `json:"msg_id"`
	Online      int        `json:"online"`
	OfflineKeys []string   `json:"offline_keys"`
	OfflineMids []int64    `json:"offline_mids"`
	Positions   []Position `json:"positions"`
}

type batchData struct {
	Accepted int           `json:"accepted"`
	Failed   int           `json:"failed"`
	Results  []batchResult `json:"results"`
}

// batch posts body to /im/push/batch and decodes a 200's results.
func (a *apiServer) batch(contentType, body string, header http.Header) (apiReply, batchData) {
	a.t.Helper()
	r := a.do(http.MethodPost, "/im/push/batch", contentType, body, header)
	var d batchData
	if r.status == http.StatusOK {
		if err := json.Unmarshal(r.Data, &d); err != nil {
			a.t.Fatalf("batch reply %s: %v", r.Data, err)
		}
		if len(d.Results) != d.Accepted+d.Failed {
			a.t.Fatalf("%d results, accepted %d + failed %d", len(d.Results), d.Accepted, d.Failed)
		}
		for i, res := range d.Results {
			if res.Index != i {
				a.t.Fatalf("result %d says index %d", i, res.Index)
			}
		}
	}
	return r, d
}

// callCounter counts Publish calls.
type callCounter struct {
	recordingPublisher
	mu    sync.Mutex
	calls int
}

func (c *callCounter) Publish(topic string, msgs ...*message.Message) error {
	c.mu.Lock()
	c.calls++
	c.mu.Unlock()
	return c.recordingPublisher.Publish(topic, msgs...)
}

// TestBatchMixedItems: good items of every route and bad ones in one
// request; each is answered in order with its index, the bad ones alone
// fail with their reason, and the good ones are published in one call,
// in order.
func TestBatchMixedItems(t *testing.T) {
	for _, form := range []string{"application/json", BatchNDJSONType, ""} {
		t.Run("content-type="+form, func(t *testing.T) {
			pub := &callCounter{}
			a := newAPI(t, apiOptions{pub: pub, history: newFakeHistory()})
			a.pub = &pub.recordingPublisher // what a.published reads
			a.online(7, "k7")
			big := strings.Repeat("x", config4080+1)
			items := []string{
				`{"keys":["k7","gone"],"operation":1000,"msg":"to a key"}`,              // 0
				`{"mids":[7,8],"operation":1001,"msg":{"json":true}}`,                   // 1
				`{"type":"live","room":"1","operation":1002,"msg":"to a room"}`,         // 2
				`{"all":true,"speed":5,"operation":1003,"msg":"to all"}`,                // 3
				`{"keys":["k7"],"operation":7,"msg":"bad op"}`,                          // 4
				`{"keys":["k7"],"mids":[7],"operation":1000,"msg":"two routes"}`,        // 5
				`{"operation":1000,"msg":"no route"}`,                                   // 6
				`{"room":"1","operation":1000,"msg":"no type"}`,                         // 7
				`{"mids":[7],"type":"live","operation":1000,"msg":"type without room"}`, // 8
				`{"keys":["k7"],"operation":1000,"msg":"` + big + `"}`,                  // 9
				`[1,2]`, // 10
				`{"keys":["k7"],"operation":1000,"msg":"x","colour":"red"}`,                                    // 11
				`{"all":false,"operation":1000,"msg":"x"}`,                                                     // 12
				`{"keys":["bad key\u0001"],"operation":1000,"msg":"x"}`,                                        // 13
				`{"mids":[7],"operation":1000,"msg":"x","idempotency_key":"` + strings.Repeat("i", 256) + `"}`, // 14
				`{"mids":[7],"operation":1004,"msg":"last","request_id":"req-last"}`,                           // 15
			}
			body := "[" + strings.Join(items, ",") + "]"
			if form == BatchNDJSONType {
				body = "\n" + strings.Join(items, "\n\n") + "\n"
			}
			r, d := a.batch(form, body, nil)
			if r.status != http.StatusOK {
				t.Fatalf("status %d: %s", r.status, deref(r.Msg))
			}
			want := []struct {
				status int
				field  string // the error names it
			}{
				{200, ""}, {200, ""}, {200, ""}, {200, ""},
				{400, "operation"}, {400, "mids"}, {400, "item"}, {400, "type"}, {400, "type"},
				{413, "msg"}, {400, "item"}, {400, "colour"}, {400, "all"}, {400, "keys"},
				{400, "idempotency_key"}, {200, ""},
			}
			if len(d.Results) != len(want) {
				t.Fatalf("%d results, want %d", len(d.Results), len(want))
			}
			for i, w := range want {
				got := d.Results[i]
				if got.Status != w.status || !strings.HasPrefix(got.Error, w.field) {
					t.Errorf("item %d: status %d error %q; want %d naming %q", i, got.Status, got.Error, w.status, w.field)
				}
				if (got.Status == 200) != (got.MsgID != "") {
					t.Errorf("item %d: status %d with msg_id %q", i, got.Status, got.MsgID)
				}
			}
			if d.Accepted != 5 || d.Failed != 11 {
				t.Errorf("accepted %d failed %d, want 5 and 11", d.Accepted, d.Failed)
			}
			if got := d.Results[0]; got.Online != 1 || !slices.Equal(got.OfflineKeys, []string{"gone"}) {
				t.Errorf("key push: online %d offline %v", got.Online, got.OfflineKeys)
			}
			if got := d.Results[1]; !slices.Equal(got.OfflineMids, []int64{8}) || len(got.Positions) != 2 {
				t.Errorf("mid push: offline %v positions %v", got.OfflineMids, got.Positions)
			}
			if got := d.Results[2]; len(got.Positions) != 1 || got.Positions[0].Stream != "room:live://1" {
				t.Errorf("room push positions %v", got.Positions)
			}
			if pub.calls != 1 {
				t.Errorf("%d publish calls, want 1", pub.calls)
			}
			var ops []int32
			for _, pm := range a.published() {
				ops = append(ops, pm.Operation)
			}
			// One message per node for key and mid pushes (k7 on n1).
			if !slices.Equal(ops, []int32{1000, 1001, 1002, 1003, 1004}) {
				t.Errorf("published operations %v, want the good items in order", ops)
			}
			if pm := a.published()[1]; string(pm.Msg) != `{"json":true}` {
				t.Errorf("a JSON msg published as %q", pm.Msg)
			}
			if pm := a.published()[3]; pm.Type != pb.PushMsg_BROADCAST || pm.Speed != 5 {
				t.Errorf("broadcast published as %v speed %d", pm.Type, pm.Speed)
			}
		})
	}
}

// config4080 is logic.max_message_bytes' default.
const config4080 = 4080

// TestBatchMalformedFailsWhole: a body that is not a list of JSON values,
// holds none or is over a limit fails whole, and nothing is published.
func TestBatchMalformedFailsWhole(t *testing.T) {
	a := newAPI(t, apiOptions{})
	a.online(7, "k7")
	good := `{"mids":[7],"operation":1000,"msg":"x"}`
	many := "[" + strings.TrimSuffix(strings.Repeat(good+",", 1001), ",") + "]"
	tests := []struct {
		name, ct, body string
		header         http.Header
		status         int
		says           string
	}{
		{"not JSON", "application/json", `[` + good + `,{"mids":`, nil, 400, "body"},
		{"an object", "application/json", good, nil, 400, "body: want a JSON array"},
		{"after the array", "application/json", "[" + good + "] []", nil, 400, "body"},
		{"empty array", "application/json", "[]", nil, 400, "body: no pushes"},
		{"empty ndjson", BatchNDJSONType, "\n\n", nil, 400, "body: no pushes"},
		{"ndjson line not JSON", BatchNDJSONType, good + "\n{oops\n" + good, nil, 400, "body: line 2"},
		{"too many", "application/json", many, nil, 413, "logic.max_batch_items"},
		{"too large", BatchNDJSONType, strings.Repeat(`{"msg":"`+strings.Repeat("y", 4000)+`"}`+"\n", 1100), nil, 413, "logic.max_batch_bytes"},
		{"other type", "text/plain", "[" + good + "]", nil, 400, "Content-Type"},
		{"Idempotency-Key header", "application/json", "[" + good + "]", http.Header{"Idempotency-Key": {"k"}}, 400, "Idempotency-Key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, _ := a.batch(tt.ct, tt.body, tt.header)
			if r.status != tt.status || !strings.Contains(deref(r.Msg), tt.says) {
				t.Fatalf("status %d %q; want %d saying %q", r.status, deref(r.Msg), tt.status, tt.says)
			}
		})
	}
	if n := a.pub.count(); n != 0 {
		t.Fatalf("%d messages published by refused batches", n)
	}
}

// TestBatchIdempotencyPerItem: each item's idempotency_key works as a
// single push's Idempotency-Key: a retried batch publishes nothing new and
// answers each item as first answered; a key reused with other content is
// 422 for that item alone; a key given twice in one batch is refused for
// the second; a batch item's key answers a single push of the same route.
func TestBatchIdempotencyPerItem(t *testing.T) {
	a := newAPI(t, apiOptions{})
	a.online(7, "k7")
	body := `[{"mids":[7],"operation":1000,"msg":"a","idempotency_key":"o-1"},
	          {"mids":[7],"operation":1000,"msg":"b","idempotency_key":"o-2"},
	          {"mids":[7],"operation":1000,"msg":"c"}]`
	_, first := a.batch("application/json", body, nil)
	if first.Accepted != 3 {
		t.Fatalf("first batch: %+v", first)
	}
	published := a.pub.count()
	_, again := a.batch("application/json", body, nil)
	for i := range 2 {
		if r := again.Results[i]; r.Status != 200 || !r.Replayed || r.MsgID != first.Results[i].MsgID {
			t.Errorf("retried item %d: %+v, want replayed %s", i, r, first.Results[i].MsgID)
		}
	}
	if r := again.Results[2]; r.Replayed || r.MsgID == first.Results[2].MsgID {
		t.Errorf("item without a key: %+v, want published again", r)
	}
	if n := a.pub.count(); n != published+1 {
		t.Errorf("the retried batch published %d messages, want 1 (its item without a key)", n-published)
	}

	before := a.pub.count()
	_, mixed := a.batch("application/json", `[{"mids":[7],"operation":1000,"msg":"other","idempotency_key":"o-1"},
		{"mids":[7],"operation":1000,"msg":"d","idempotency_key":"o-3"},
		{"mids":[7],"operation":1000,"msg":"d","idempotency_key":"o-3"},
		{"mids":[7],"operation":1000,"msg":"e","idempotency_key":"o-3"}]`, nil)
	if r := mixed.Results[0]; r.Status != http.StatusUnprocessableEntity {
		t.Errorf("key reused with other content: %+v, want 422", r)
	}
	if r := mixed.Results[1]; r.Status != 200 || r.Replayed {
		t.Errorf("new key: %+v", r)
	}
	// The same key twice in one request is one push, answered twice.
	if r := mixed.Results[2]; r.Status != 200 || !r.Replayed || r.MsgID != mixed.Results[1].MsgID {
		t.Errorf("key given twice: %+v, want the first's reply, replayed", r)
	}
	if r := mixed.Results[3]; r.Status != http.StatusUnprocessableEntity {
		t.Errorf("key given twice with other content: %+v, want 422", r)
	}
	if n := a.pub.count() - before; n != 1 {
		t.Errorf("%d messages published, want 1", n)
	}

	// The same push as a single request with the item's key.
	single := a.do(http.MethodPost, "/im/push/mids?operation=1000&mids=7", "", "a", http.Header{"Idempotency-Key": {"o-1"}})
	var d pushData
	_ = json.Unmarshal(single.Data, &d)
	if single.status != 200 || single.header.Get("Idempotent-Replayed") != "true" || d.MsgID != first.Results[0].MsgID {
		t.Errorf("single push with a batch item's key: %d replayed %q msg_id %s, want %s",
			single.status, single.header.Get("Idempotent-Replayed"), d.MsgID, first.Results[0].MsgID)
	}
}

// TestBatchPositionsInItemOrder: pushes of one batch to one room or user
// take their positions in the order of the batch, while the others'
// positions are taken alongside.
func TestBatchPositionsInItemOrder(t *testing.T) {
	a := newAPI(t, apiOptions{history: newFakeHistory()})
	a.online(7, "k7")
	var items []string
	for i := range 200 {
		switch i % 4 {
		case 0:
			items = append(items, fmt.Sprintf(`{"type":"live","room":"a","operation":1000,"msg":"%d"}`, i))
		case 1:
			items = append(items, fmt.Sprintf(`{"type":"live","room":"r%d","operation":1000,"msg":"%d"}`, i, i))
		case 2:
			items = append(items, fmt.Sprintf(`{"keys":["k7"],"operation":1000,"msg":"%d"}`, i))
		case 3:
			items = append(items, fmt.Sprintf(`{"mids":[7,%d],"operation":1000,"msg":"%d"}`, 1000+i, i))
		}
	}
	_, d := a.batch(BatchNDJSONType, strings.Join(items, "\n"), nil)
	if d.Accepted != len(items) {
		t.Fatalf("accepted %d of %d", d.Accepted, len(items))
	}
	last := map[string]uint64{}
	for i, r := range d.Results {
		for _, p := range r.Positions {
			if p.Pos != last[p.Stream]+1 {
				t.Fatalf("item %d: %s at %d after %d", i, p.Stream, p.Pos, last[p.Stream])
			}
			last[p.Stream] = p.Pos
		}
	}
	if last["room:live://a"] != 50 || last["user:7"] != 100 {
		t.Fatalf("tops %v", last)
	}
	// Published in item order: each stream's positions rise in the
	// order the broker has them.
	seen := map[string]uint64{}
	for _, pm := range a.published() {
		for _, sp := range pm.Positions {
			if sp.Pos <= seen[sp.Stream] {
				t.Fatalf("%s: %d published after %d", sp.Stream, sp.Pos, seen[sp.Stream])
			}
			seen[sp.Stream] = sp.Pos
		}
	}
}

// TestBatchBrokerDown: when the broker refuses the batch's publish, every
// item it held is answered 503 (with Retry-After) and its key released,
// so the same batch retried once the broker is back is published whole.
func TestBatchBrokerDown(t *testing.T) {
	pub := &recordingPublisher{fail: errors.New("broker gone")}
	a := newAPI(t, apiOptions{pub: pub})
	a.pub = pub
	a.online(7, "k7")
	body := `[{"keys":["k7"],"operation":1000,"msg":"a","idempotency_key":"x-1"},{"keys":["k7"],"operation":1000},
	          {"type":"live","room":"1","operation":1000,"msg":"b","idempotency_key":"x-2"}]`
	r, d := a.batch("application/json", body, nil)
	if r.header.Get("Retry-After") == "" {
		t.Error("no Retry-After with items answered 503")
	}
	for i, want := range []int{503, 400, 503} {
		if d.Results[i].Status != want {
			t.Errorf("item %d: %+v, want %d", i, d.Results[i], want)
		}
	}
	pub.mu.Lock()
	pub.fail = nil
	pub.mu.Unlock()
	r, d = a.batch("application/json", body, nil)
	if d.Accepted != 2 || d.Results[0].Replayed || d.Results[2].Replayed || r.header.Get("Retry-After") != "" {
		t.Fatalf("retried batch: %+v (Retry-After %q)", d, r.header.Get("Retry-After"))
	}
	if n := pub.count(); n != 2 {
		t.Fatalf("%d messages published, want 2", n)
	}
}

// TestBatchItemOverASinglePushIs413: an item larger than a single push's
// JSON body (a message with thousands of targets) fails alone with 413.
func TestBatchItemOverASinglePushIs413(t *testing.T) {
	a := newAPI(t, apiOptions{})
	var mids []string
	for i := range 20000 {
		mids = append(mids, fmt.Sprint(i+1))
	}
	body := `[{"mids":[` + strings.Join(mids, ",") + `],"operation":1000,"msg":"x"},{"mids":[1],"operation":1000,"msg":"y"}]`
	_, d := a.batch("application/json", body, nil)
	if d.Results[0].Status != http.StatusRequestEntityTooLarge || !strings.HasPrefix(d.Results[0].Error, "item") || d.Results[1].Status != 200 {
		t.Fatalf("results %+v", d.Results)
	}
}

// TestBatchItemHeaderFields: an item's request_id and idempotency_key are
// held to the headers' rules (text, at most 255 bytes), each failing its
// item alone; an X-Request-ID header given twice fails the batch.
func TestBatchItemHeaderFields(t *testing.T) {
	a := newAPI(t, apiOptions{})
	a.online(7, "k7")
	body := `[{"mids":[7],"operation":1000,"msg":"x","request_id":"r\u0001"},
	          {"mids":[7],"operation":1000,"msg":"x","request_id":"` + strings.Repeat("r", 256) + `"},
	          {"mids":[7],"operation":1000,"msg":"x","idempotency_key":"k` + "\xff" + `"},
	          {"mids":[7],"operation":1000,"msg":"x","idempotency_key":["a","b"]},
	          {"mids":[7],"operation":1000,"msg":"ok","request_id":"fine"}]`
	_, d := a.batch("application/json", body, nil)
	for i, field := range []string{"request_id", "request_id", "idempotency_key", "idempotency_key"} {
		if r := d.Results[i]; r.Status != http.StatusBadRequest || !strings.HasPrefix(r.Error, field) {
			t.Errorf("item %d: %+v, want 400 naming %s", i, r, field)
		}
	}
	if r := d.Results[4]; r.Status != 200 {
		t.Errorf("good item: %+v", r)
	}
	if n := a.pub.count(); n != 1 {
		t.Errorf("%d published, want 1", n)
	}
	r, _ := a.batch("application/json", `[{"mids":[7],"operation":1000,"msg":"x"}]`, http.Header{"X-Request-Id": {"a", "b"}})
	if r.status != http.StatusBadRequest {
		t.Errorf("X-Request-ID twice: %d", r.status)
	}
}
