package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"imcloud/proto/client"
	"imcloud/stages/logic"
	"imcloud/stages/logic/token"
)

type batchReply struct {
	Accepted int `json:"accepted"`
	Failed   int `json:"failed"`
	Results  []struct {
		Index    int    `json:"index"`
		Status   int    `json:"status"`
		Error    string `json:"error"`
		Replayed bool   `json:"replayed"`
		MsgID    string `json:"msg_id"`
	} `json:"results"`
}

// inOrder reads len(want) messages from c and checks that it got them
// all, each stream's in want's order.
func inOrder(t *testing.T, name string, c *client.Conn, want []string, stream func(body string) string) {
	t.Helper()
	next := map[string][]string{}
	for _, w := range want {
		next[stream(w)] = append(next[stream(w)], w)
	}
	for range want {
		_ = c.SetReadDeadline(time.Now().Add(wait))
		p, err := c.Read()
		if err != nil {
			t.Fatalf("%s: read: %v", name, err)
		}
		got := string(p.Body)
		q := next[stream(got)]
		if len(q) == 0 || q[0] != got {
			t.Fatalf("%s: got %q, want the next of its stream %v", name, got, q)
		}
		next[stream(got)] = q[1:]
	}
}

// TestBatchPush drives POST /im/push/batch through every stage: a batch
// mixing key, mid, room and broadcast pushes with bad items reaches each
// client in the batch's order while the bad items alone are refused; the
// same batch again is answered from its items' idempotency keys and
// delivers nothing new; an oversized batch is 413 and delivers nothing.
func TestBatchPush(t *testing.T) {
	h := start(t, "logic.max_batch_bytes=65536")
	room := uniq("b")
	a := h.connect("ws", token.Claims{Mid: 1, Key: "ka", Rooms: []string{"live://" + room}})
	b := h.connect("tcp", token.Claims{Mid: 2, Key: "kb"})

	var items []string
	var wantA, wantB []string
	bad := map[int]bool{}
	for i := range 40 {
		switch i % 4 {
		case 0:
			body := fmt.Sprintf("room-%d", i)
			items = append(items, fmt.Sprintf(`{"type":"live","room":%q,"operation":1000,"msg":%q,"idempotency_key":"r-%d"}`, room, body, i))
			wantA = append(wantA, body)
		case 1:
			body := fmt.Sprintf("mid-%d", i)
			items = append(items, fmt.Sprintf(`{"mids":[2],"operation":1000,"msg":%q,"idempotency_key":"m-%d"}`, body, i))
			wantB = append(wantB, body)
		case 2:
			body := fmt.Sprintf("key-%d", i)
			items = append(items, fmt.Sprintf(`{"keys":["ka","kb"],"operation":1000,"msg":%q,"idempotency_key":"k-%d"}`, body, i))
			wantA = append(wantA, body)
			wantB = append(wantB, body)
		case 3:
			items = append(items, fmt.Sprintf(`{"keys":["ka"],"operation":1000,"msg":"bad-%d","room":"x"}`, i))
			bad[i] = true
		}
	}
	items = append(items, `{"all":true,"operation":1000,"msg":"everyone","idempotency_key":"all-1"}`)
	wantA = append(wantA, "everyone")
	wantB = append(wantB, "everyone")
	body := "[" + strings.Join(items, ",\n") + "]"

	send := func() batchReply {
		t.Helper()
		rep := h.push(request{path: "/im/push/batch", body: body, contentType: "application/json"})
		var d batchReply
		if err := json.Unmarshal(rep.Data, &d); err != nil {
			t.Fatal(err)
		}
		if len(d.Results) != len(items) || d.Failed != len(bad) {
			t.Fatalf("%d results, %d failed; want %d, %d", len(d.Results), d.Failed, len(items), len(bad))
		}
		for i, r := range d.Results {
			if r.Index != i || (r.Status == http.StatusBadRequest) != bad[i] {
				t.Fatalf("result %d: %+v", i, r)
			}
		}
		return d
	}
	first := send()
	// Each stream's pushes arrive in the batch's order (A's room and
	// user streams, B's user stream, which its mid and key pushes share);
	// streams are not ordered with each other, nor the broadcast, which
	// has none.
	prefix := func(body string) string { s, _, _ := strings.Cut(body, "-"); return s }
	inOrder(t, "A", a, wantA, prefix) // room-, key- (user:1), everyone
	inOrder(t, "B", b, wantB, func(body string) string {
		if s := prefix(body); s == "mid" || s == "key" {
			return "user:2"
		}
		return body
	})

	again := send()
	for i, r := range again.Results {
		if !bad[i] && (!r.Replayed || r.MsgID != first.Results[i].MsgID) {
			t.Fatalf("retried item %d: %+v, want replayed %s", i, r, first.Results[i].MsgID)
		}
	}

	big := strings.Repeat(`{"keys":["ka"],"operation":1000,"msg":"`+strings.Repeat("z", 1000)+`"}`+"\n", 70)
	if code, rep := h.do(request{path: "/im/push/batch", body: big, contentType: logic.BatchNDJSONType}); code != http.StatusRequestEntityTooLarge {
		t.Fatalf("oversized batch: %d %+v", code, rep)
	}

	// Nothing of the retried or the oversized batch reached anyone: the
	// next packet of each is the fence.
	for name, c := range map[string]string{"A": "ka", "B": "kb"} {
		fence := uniq("fence")
		h.push(request{path: "/im/push/keys", query: map[string][]string{"operation": {"1000"}, "keys": {c}}, body: fence})
		conn := a
		if name == "B" {
			conn = b
		}
		expect(t, name, conn, 1000, fence)
	}
}
