package e2e

import (
	"net/url"
	"testing"

	"imcloud/proto/client"
	"imcloud/proto/wire"
	"imcloud/stages/logic/token"
)

// changeRoom sends op 12 and returns the reply's body, or the close code
// (0 for a reply).
func changeRoom(t *testing.T, c *client.Conn, room string) (string, int) {
	t.Helper()
	if _, err := c.Send(wire.OpChangeRoom, []byte(room)); err != nil {
		t.Fatal(err)
	}
	for {
		p, err := c.Read()
		if err != nil {
			return "", client.CloseCode(err)
		}
		if p.Op == wire.OpChangeRoomReply {
			return string(p.Body), 0
		}
	}
}

// TestRoomsAreAuthorized: with JWT tokens op 12 joins only what the
// token's rooms claim grants, exactly or by a pattern; on main a token
// granting public://lobby joined private://board-meeting and read its
// pushes.
func TestRoomsAreAuthorized(t *testing.T) {
	h := start(t)
	roomPush := func(typ, room, body string) {
		h.push(request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "type": {typ}, "room": {room}}, body: body})
	}

	lobby := h.connect("ws", token.Claims{Mid: 1, Key: "lobby-only", Rooms: []string{"public://lobby"}})
	if _, code := changeRoom(t, lobby, "private://board-meeting"); code != 4403 {
		t.Fatalf("op 12 to a room not granted: close code %d, want 4403", code)
	}

	live := h.connect("ws", token.Claims{Mid: 2, Key: "live-fan", Rooms: []string{"public://lobby", "live://*"}})
	if body, code := changeRoom(t, live, "live://7"); code != 0 || body != "live://7" {
		t.Fatalf("op 12 to a room a pattern grants: reply %q, close code %d", body, code)
	}
	roomPush("private", "board-meeting", "secret") // reaches nobody
	roomPush("live", "7", "on air")
	expect(t, "pushed to the granted room", live, 1000, "on air")
	if _, code := changeRoom(t, live, "live2://x"); code != 4403 {
		t.Fatalf("op 12 to live2://x with live://*: close code %d, want 4403", code)
	}
}

// TestInsecureJSONJoinsAnyRoom: goim's insecure-json mode keeps goim's
// behaviour, any room.
func TestInsecureJSONJoinsAnyRoom(t *testing.T) {
	h := start(t, "logic.auth.mode=insecure-json")
	c := h.dial("tcp")
	if _, err := c.Auth([]byte(`{"mid":5,"key":"goim","room_id":"live://1"}`)); err != nil {
		t.Fatal(err)
	}
	if body, code := changeRoom(t, c, "private://board-meeting"); code != 0 || body != "private://board-meeting" {
		t.Fatalf("op 12 in insecure-json: reply %q, close %d", body, code)
	}
	h.push(request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "type": {"private"}, "room": {"board-meeting"}}, body: "hi"})
	expect(t, "pushed to the joined room", c, 1000, "hi")
}
