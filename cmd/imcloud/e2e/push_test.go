package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"imcloud/proto/client"
	"imcloud/proto/wire"
	"imcloud/stages/logic"
	"imcloud/stages/logic/token"
)

// pushCase is one push and who must receive it.
type pushCase struct {
	name      string
	route     string         // push/keys, push/mids, push/room, push/all
	params    map[string]any // string, int or []string / []int64
	op        int32
	receivers []string
}

func TestPushRoutesDeliverToExactlyTheirTargets(t *testing.T) {
	h := start(t)
	clients := map[string]*client.Conn{
		"A": h.connect("ws", token.Claims{Mid: 1, Key: "ka", Rooms: []string{"live://1000"}}),
		"B": h.connect("tcp", token.Claims{Mid: 2, Key: "kb", Rooms: []string{"live://1000"}, Accepts: []int32{1001}}),
		"C": h.connect("ws", token.Claims{Mid: 3, Key: "kc", Rooms: []string{"live://2000", "live://3000"}, Accepts: []int32{1000}}),
		"D": h.connect("tcp", token.Claims{Mid: 1, Key: "kd"}),
	}
	// fence is a push each client accepts, sent to the clients that must
	// not have received a case's message: their next packet must be it.
	fence := map[string]struct {
		key string
		op  int32
	}{"A": {"ka", 1000}, "B": {"kb", 1001}, "C": {"kc", 1000}, "D": {"kd", 1000}}

	cases := []pushCase{
		{"keys", "push/keys", map[string]any{"keys": []string{"ka", "kc"}}, 1000, []string{"A", "C"}},
		{"keys filtered by accepts", "push/keys", map[string]any{"keys": []string{"kb", "kc"}}, 1001, []string{"B"}},
		{"mids reach every connection of a user", "push/mids", map[string]any{"mids": []int64{1}}, 1000, []string{"A", "D"}},
		{"mids filtered by accepts", "push/mids", map[string]any{"mids": []int64{2, 3}}, 1001, []string{"B"}},
		{"room", "push/room", map[string]any{"type": "live", "room": "1000"}, 1000, []string{"A"}},
		{"room other op", "push/room", map[string]any{"type": "live", "room": "1000"}, 1001, []string{"A", "B"}},
		{"second room of a connection", "push/room", map[string]any{"type": "live", "room": "3000"}, 1000, []string{"C"}},
		{"all", "push/all", map[string]any{}, 1000, []string{"A", "C", "D"}},
		{"all paced", "push/all", map[string]any{"speed": 1000}, 1001, []string{"A", "B", "D"}},
	}
	for _, tc := range cases {
		for _, prefix := range []string{"/im/", "/goim/"} {
			for _, form := range []string{"query", "json"} {
				if prefix == "/goim/" && form == "json" {
					continue // under /goim/ the body is always the message
				}
				name := fmt.Sprintf("%s%s %s/%s", prefix, tc.route, tc.name, form)
				t.Run(name, func(t *testing.T) {
					body := uniq(strings.ReplaceAll(name, " ", "_"))
					h.push(buildRequest(t, prefix+tc.route, form, tc.op, tc.params, body))
					for _, r := range tc.receivers {
						expect(t, r, clients[r], tc.op, body)
					}
					for id, c := range clients {
						if slices.Contains(tc.receivers, id) {
							continue
						}
						f := fence[id]
						fb := uniq("fence-" + id)
						h.push(buildRequest(t, "/im/push/keys", "query", f.op, map[string]any{"keys": []string{f.key}}, fb))
						expect(t, id+" (must not have received the push)", c, f.op, fb)
					}
				})
			}
		}
	}
}

// buildRequest renders a push in the query+raw-body form or the JSON form.
func buildRequest(t *testing.T, path, form string, op int32, params map[string]any, msg string) request {
	t.Helper()
	if form == "json" {
		obj := map[string]any{"operation": op, "msg": msg}
		for k, v := range params {
			obj[k] = v
		}
		b, err := json.Marshal(obj)
		if err != nil {
			t.Fatal(err)
		}
		return request{path: path, body: string(b), contentType: logic.PushJSONType}
	}
	q := url.Values{"operation": {fmt.Sprint(op)}}
	for k, v := range params {
		switch v := v.(type) {
		case []string:
			q[k] = v
		case []int64:
			for _, n := range v {
				q.Add(k, fmt.Sprint(n))
			}
		default:
			q.Set(k, fmt.Sprint(v))
		}
	}
	return request{path: path, query: q, body: msg, contentType: "text/plain"}
}

func TestPushReplyReportsOnlineAndOffline(t *testing.T) {
	h := start(t)
	h.connect("ws", token.Claims{Mid: 5, Key: "k5"})
	// Targets named twice are one recipient each: listed once.
	rep := h.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"k5", "gone", "k5", "gone"}}, body: "x"})
	var data struct {
		MsgID       string   `json:"msg_id"`
		Online      int      `json:"online"`
		OfflineKeys []string `json:"offline_keys"`
	}
	if err := json.Unmarshal(rep.Data, &data); err != nil {
		t.Fatal(err)
	}
	if data.MsgID == "" || data.Online != 1 || !slices.Equal(data.OfflineKeys, []string{"gone"}) {
		t.Fatalf("reply data = %+v, want a msg_id, 1 online, offline [gone]", data)
	}
	rep = h.push(request{path: "/im/push/mids", query: url.Values{"operation": {"1000"}, "mids": {"5", "6", "6"}}, body: "x"})
	var mids struct {
		Online      int     `json:"online"`
		OfflineMids []int64 `json:"offline_mids"`
	}
	if err := json.Unmarshal(rep.Data, &mids); err != nil {
		t.Fatal(err)
	}
	if mids.Online != 1 || !slices.Equal(mids.OfflineMids, []int64{6}) {
		t.Fatalf("mids reply data = %+v, want 1 online, offline [6]", mids)
	}
}

func TestJSONMessageValues(t *testing.T) {
	h := start(t)
	c := h.connect("ws", token.Claims{Mid: 9, Key: "k9"})
	tests := []struct {
		msg  string // raw JSON value of the msg field
		want string // body the client must receive
	}{
		{`"plain text"`, "plain text"},
		{`{"a":1,"b":[true]}`, `{"a":1,"b":[true]}`},
		{`42`, `42`},
	}
	for _, tt := range tests {
		body := `{"operation":"1000","keys":"k9","msg":` + tt.msg + `}`
		h.push(request{path: "/im/push/keys", body: body, contentType: logic.PushJSONType + "; charset=utf-8"})
		expect(t, tt.msg, c, 1000, tt.want)
	}
}

func TestHTTPErrors(t *testing.T) {
	h := start(t)
	big := strings.Repeat("x", h.cfg.Logic.MaxMessageBytes+1)
	tests := []struct {
		name     string
		req      request
		status   int
		mentions string
	}{
		{"missing api key", request{path: "/im/push/all", query: url.Values{"operation": {"1000"}}, noAPIKey: true}, http.StatusUnauthorized, "API key"},
		{"wrong api key", request{path: "/goim/push/all", query: url.Values{"operation": {"1000"}}, noAPIKey: true, header: http.Header{"Authorization": {"Bearer nope"}}}, http.StatusUnauthorized, "API key"},
		{"missing operation", request{path: "/im/push/keys", query: url.Values{"keys": {"a"}}}, http.StatusBadRequest, "operation"},
		{"operation not a number", request{path: "/im/push/keys", query: url.Values{"operation": {"x"}, "keys": {"a"}}}, http.StatusBadRequest, "operation"},
		{"protocol operation", request{path: "/im/push/all", query: url.Values{"operation": {"3"}}}, http.StatusBadRequest, "operation"},
		{"missing keys", request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}}}, http.StatusBadRequest, "keys"},
		{"missing mids", request{path: "/im/push/mids", query: url.Values{"operation": {"1000"}}}, http.StatusBadRequest, "mids"},
		{"malformed mids", request{path: "/im/push/mids", query: url.Values{"operation": {"1000"}, "mids": {"1", "abc"}}}, http.StatusBadRequest, "mids"},
		{"missing room type", request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "room": {"1"}}}, http.StatusBadRequest, "type"},
		{"missing room", request{path: "/goim/push/room", query: url.Values{"operation": {"1000"}, "type": {"live"}}}, http.StatusBadRequest, "room"},
		{"negative speed", request{path: "/im/push/all", query: url.Values{"operation": {"1000"}, "speed": {"-1"}}}, http.StatusBadRequest, "speed"},
		{"malformed json", request{path: "/im/push/all", body: `{"operation":`, contentType: logic.PushJSONType}, http.StatusBadRequest, "JSON"},
		{"json without msg", request{path: "/im/push/all", body: `{"operation":1000}`, contentType: logic.PushJSONType}, http.StatusBadRequest, "msg"},
		{"json unknown field", request{path: "/im/push/all", body: `{"operation":1000,"msg":"x","speeed":1}`, contentType: logic.PushJSONType}, http.StatusBadRequest, "speeed"},
		{"message too large", request{path: "/im/push/all", query: url.Values{"operation": {"1000"}}, body: big}, http.StatusRequestEntityTooLarge, "msg"},
		{"json message too large", request{path: "/im/push/all", body: `{"operation":1000,"msg":"` + big + `"}`, contentType: logic.PushJSONType}, http.StatusRequestEntityTooLarge, "msg"},
		{"unknown route", request{path: "/im/push/nowhere"}, http.StatusNotFound, "no such route"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, rep := h.do(tt.req)
			if status != tt.status {
				t.Fatalf("status %d, want %d (reply %+v)", status, tt.status, rep)
			}
			if rep.Code != -tt.status || !strings.Contains(rep.Message, tt.mentions) {
				t.Fatalf("reply %+v: want code %d and a message naming %q", rep, -tt.status, tt.mentions)
			}
		})
	}
}

// TestRoomBatchArrivesAsOneFrame: room messages job gathers into a batch
// reach a WebSocket client as one op 9 frame.
func TestRoomBatchArrivesAsOneFrame(t *testing.T) {
	const n = 5
	h := start(t, "job.room_batch_window=1m", fmt.Sprintf("job.room_batch_size=%d", n))
	ws, _, err := websocket.DefaultDialer.Dial("ws://"+h.addrs.CloudWS+"/sub", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	_ = ws.SetReadDeadline(time.Now().Add(wait))
	tok := h.token(token.Claims{Mid: 1, Rooms: []string{"live://batch"}}, time.Hour)
	if err := ws.WriteMessage(websocket.BinaryMessage, wire.Encode(wire.OpAuth, 1, []byte(tok))); err != nil {
		t.Fatal(err)
	}
	if _, frame, err := ws.ReadMessage(); err != nil || !strings.Contains(string(frame), `"mid":1`) {
		t.Fatalf("auth reply %q, %v", frame, err)
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if code, rep := h.do(request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "type": {"live"}, "room": {"batch"}}, body: fmt.Sprint("b", i)}); code != 200 {
				t.Errorf("push %d: %d %+v", i, code, rep)
			}
		})
	}
	wg.Wait()
	_, frame, err := ws.ReadMessage()
	if err != nil {
		t.Fatal(err)
	}
	outer, _, err := wire.Decode(frame, 1<<20)
	if err != nil || outer.Op != wire.OpRaw {
		t.Fatalf("frame is op %d (%v), want one op 9 batch", outer.Op, err)
	}
	inner, err := wire.DecodeAll(outer.Body, wire.DefaultMaxBody)
	if err != nil || len(inner) != n {
		t.Fatalf("op 9 frame carries %d packets (%v), want %d", len(inner), err, n)
	}
}
