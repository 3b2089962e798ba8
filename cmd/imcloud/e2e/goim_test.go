package e2e

import (
	"net/http"
	"net/url"
	"testing"

	"imcloud/stages/logic/token"
)

// TestGoimToolsReachClientsUnchanged sends the requests goim's push tools
// send (benchmarks/push_room and push_rooms: the message as an
// application/json body; benchmarks/push: an
// application/x-www-form-urlencoded body) and checks that each client
// receives the body byte for byte, in the room or as the user the query
// string names. On main goim's push_room got 400 "unknown field", and
// {"room":"2","msg":"hello"} posted to room 1 reached room 2 as "hello".
func TestGoimToolsReachClientsUnchanged(t *testing.T) {
	h := start(t)
	one := h.connect("ws", token.Claims{Mid: 5, Key: "k5", Rooms: []string{"test://1"}})
	two := h.connect("tcp", token.Claims{Mid: 6, Key: "k6", Rooms: []string{"test://2"}})
	tests := []struct {
		name, path, contentType, body string
		query                         url.Values
	}{
		{"goim push_room", "/goim/push/room", "application/json", `{"test":1}`,
			url.Values{"operation": {"1000"}, "type": {"test"}, "room": {"1"}}},
		{"a JSON message naming room 2, to room 1 (goim)", "/goim/push/room", "application/json", `{"room":"2","msg":"hello"}`,
			url.Values{"operation": {"1000"}, "type": {"test"}, "room": {"1"}}},
		{"a JSON message naming room 2, to room 1 (imcloud)", "/im/push/room", "application/json", `{"room":"2","msg":"hello"}`,
			url.Values{"operation": {"1000"}, "type": {"test"}, "room": {"1"}}},
		{"goim push to mids, form content type", "/goim/push/mids", "application/x-www-form-urlencoded", `{"m":{"test":1},"u":5}`,
			url.Values{"operation": {"1000"}, "mids": {"5"}}},
		{"a JSON message naming mid 6, to mid 5", "/im/push/mids", "application/json", `{"mids":[6],"msg":"x"}`,
			url.Values{"operation": {"1000"}, "mids": {"5"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, rep := h.do(request{path: tt.path, query: tt.query, body: tt.body, contentType: tt.contentType})
			if status != http.StatusOK || rep.Code != 0 {
				t.Fatalf("status %d reply %+v", status, rep)
			}
			expect(t, tt.name, one, 1000, tt.body)
			// Fence: two's next packet is this, so it received nothing before.
			fence := uniq("fence")
			h.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"k6"}}, body: fence})
			expect(t, "mid 6 (must not have received the push)", two, 1000, fence)
		})
	}
}
