package e2e

import (
	"context"
	"encoding/binary"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"imcloud/pipeline"
	"imcloud/proto/client"
	"imcloud/proto/wire"
	"imcloud/stages/logic/token"
)

func TestRejectedTokensCloseWithoutAuthReply(t *testing.T) {
	h := start(t)
	forged, err := token.Sign("not-the-secret", token.Claims{Mid: 1}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	expired := h.token(token.Claims{Mid: 1}, -time.Minute)
	noneAlg, err := jwt.NewWithClaims(jwt.SigningMethodNone, token.Claims{Mid: 1, RegisteredClaims: jwt.RegisteredClaims{ExpiresAt: jwt.NewNumericDate(time.Now().Add(time.Hour))}}).SignedString(jwt.UnsafeAllowNoneSignatureType)
	if err != nil {
		t.Fatal(err)
	}
	tokens := map[string]string{
		"forged":           forged,
		"expired":          expired,
		"alg none":         noneAlg,
		"no mid":           h.token(token.Claims{Key: "x"}, time.Hour),
		"not a token":      "garbage",
		"goim json in jwt": `{"mid":1,"room_id":"live://1"}`,
	}
	for name, tok := range tokens {
		for _, tr := range []string{"ws", "tcp"} {
			t.Run(name+"/"+tr, func(t *testing.T) {
				c := h.dial(tr)
				if _, err := c.Send(wire.OpAuth, []byte(tok)); err != nil {
					t.Fatal(err)
				}
				err := expectClosed(t, "rejected token", c)
				if tr == "ws" && client.CloseCode(err) != 4401 {
					t.Fatalf("close error %v, want close code 4401", err)
				}
			})
		}
	}
}

func TestProtocolViolationsCloseOnlyThatConnection(t *testing.T) {
	h := start(t, "cloud.max_body_bytes=512", "cloud.handshake_timeout=300ms")
	bystander := h.connect("tcp", token.Claims{Mid: 1, Key: "bystander"})

	oversizedHeader := make([]byte, wire.HeaderLen)
	wire.PutHeader(oversizedHeader, 1<<30, wire.OpHeartbeat, 1)
	wrongHeaderLen := wire.Encode(wire.OpAuth, 1, nil)
	binary.BigEndian.PutUint16(wrongHeaderLen[4:], 20)

	tests := []struct {
		name      string
		transport string
		auth      bool
		send      []byte // nil sends nothing (handshake timeout)
		wsCode    int
	}{
		{"oversized packet after auth", "ws", true, wire.Encode(wire.OpSendMsg, 2, make([]byte, 513)), 1009},
		{"oversized packet after auth", "tcp", true, wire.Encode(wire.OpSendMsg, 2, make([]byte, 513)), 0},
		{"huge length in header", "tcp", true, oversizedHeader, 0},
		{"oversized auth packet", "ws", false, wire.Encode(wire.OpAuth, 1, make([]byte, 513)), 1009},
		{"wrong header length", "ws", false, wrongHeaderLen, 1002},
		{"wrong header length", "tcp", false, wrongHeaderLen, 0},
		{"unknown op before auth", "ws", false, wire.Encode(1000, 1, []byte("hi")), 1002},
		{"heartbeat before auth", "tcp", false, wire.Encode(wire.OpHeartbeat, 1, nil), 0},
		{"second auth", "ws", true, wire.Encode(wire.OpAuth, 2, nil), 1002},
		{"truncated packet then silence", "tcp", false, wire.Encode(wire.OpAuth, 1, []byte("abc"))[:18], 0},
		{"handshake timeout", "ws", false, nil, 0},
		{"handshake timeout", "tcp", false, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name+"/"+tt.transport, func(t *testing.T) {
			var c *client.Conn
			if tt.auth {
				c = h.connect(tt.transport, token.Claims{Mid: 2})
			} else {
				c = h.dial(tt.transport)
			}
			if tt.send != nil {
				if err := c.WriteRaw(tt.send); err != nil {
					t.Fatal(err)
				}
			}
			err := expectClosed(t, tt.name, c)
			if tt.wsCode != 0 && client.CloseCode(err) != tt.wsCode {
				t.Fatalf("closed with %v, want close code %d", err, tt.wsCode)
			}
			body := uniq("still-here")
			h.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"bystander"}}, body: body})
			expect(t, "bystander", bystander, 1000, body)
		})
	}
}

func TestInsecureJSONGoimClientGetsRoomPush(t *testing.T) {
	h := start(t, "logic.auth.mode=insecure-json")
	for _, tr := range []string{"tcp", "ws"} {
		t.Run(tr, func(t *testing.T) {
			c := h.dial(tr)
			reply, err := c.Auth([]byte(`{"mid":123,"key":"","room_id":"live://1000","platform":"web","accepts":[1000,1001,1002]}`))
			if err != nil {
				t.Fatal(err)
			}
			if reply.Mid != 123 || reply.Key == "" || len(reply.Rooms) != 1 || reply.Rooms[0] != "live://1000" {
				t.Fatalf("auth reply %+v", reply)
			}
			body := uniq("goim room push")
			h.push(request{path: "/goim/push/room", query: url.Values{"operation": {"1001"}, "type": {"live"}, "room": {"1000"}}, body: body})
			expect(t, "goim client", c, 1001, body)
		})
	}
}

func TestHeartbeatRepliesWithRoomOnlineCount(t *testing.T) {
	h := start(t)
	a := h.connect("ws", token.Claims{Mid: 1, Rooms: []string{"live://7"}})
	h.connect("tcp", token.Claims{Mid: 2, Rooms: []string{"live://7"}})
	h.connect("tcp", token.Claims{Mid: 3, Rooms: []string{"live://8"}})
	seq, err := a.Send(wire.OpHeartbeat, nil)
	if err != nil {
		t.Fatal(err)
	}
	p, err := a.Read()
	if err != nil {
		t.Fatal(err)
	}
	if p.Op != wire.OpHeartbeatReply || p.Seq != seq || len(p.Body) != 4 {
		t.Fatalf("heartbeat reply op %d seq %d body %x, want op 3 seq %d and 4 bytes", p.Op, p.Seq, p.Body, seq)
	}
	if n := binary.BigEndian.Uint32(p.Body); n != 2 {
		t.Fatalf("room online count %d, want 2", n)
	}
}

func TestChangeRoomAndOperationFilters(t *testing.T) {
	h := start(t)
	c := h.connect("ws", token.Claims{Mid: 1, Key: "mover", Rooms: []string{"live://1", "live://*"}})
	roomPush := func(room, op, body string) {
		h.push(request{path: "/im/push/room", query: url.Values{"operation": {op}, "type": {"live"}, "room": {room}}, body: body})
	}
	keyPush := func(op, body string) {
		h.push(request{path: "/im/push/keys", query: url.Values{"operation": {op}, "keys": {"mover"}}, body: body})
	}
	call := func(op int32, body string) {
		t.Helper()
		seq, err := c.Send(op, []byte(body))
		if err != nil {
			t.Fatal(err)
		}
		p := expect(t, "reply", c, op+1, body)
		if p.Seq != seq {
			t.Fatalf("reply seq %d, want %d", p.Seq, seq)
		}
	}

	call(wire.OpChangeRoom, "live://2")
	roomPush("1", "1000", "old room") // must not arrive
	roomPush("2", "1000", "new room")
	expect(t, "after change room", c, 1000, "new room")

	call(wire.OpChangeRoom, "")        // leave every room
	roomPush("2", "1000", "left room") // must not arrive
	keyPush("1000", "fence 1")
	expect(t, "after leaving", c, 1000, "fence 1")

	call(wire.OpSub, "1005,1006")
	keyPush("1000", "filtered") // no longer accepted
	keyPush("1005", "accepted")
	expect(t, "after sub", c, 1005, "accepted")

	call(wire.OpUnsub, "1005")
	keyPush("1005", "unsubscribed") // must not arrive
	keyPush("1006", "still subscribed")
	expect(t, "after unsub", c, 1006, "still subscribed")
}

func TestUpstreamMessageIsPublishedAndAcknowledged(t *testing.T) {
	h := start(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	msgs, err := h.node.Broker().Subscriber.Subscribe(ctx, h.cfg.Topics.Upstream)
	if err != nil {
		t.Fatal(err)
	}
	c := h.connect("tcp", token.Claims{Mid: 42, Key: "up", Rooms: []string{"live://1", "live://2"}})
	seq, err := c.Send(wire.OpSendMsg, []byte("hello business"))
	if err != nil {
		t.Fatal(err)
	}
	p := expect(t, "op 5", c, wire.OpSendMsgReply, "")
	if p.Seq != seq {
		t.Fatalf("op 5 seq %d, want %d", p.Seq, seq)
	}
	select {
	case m := <-msgs:
		m.Ack()
		md := m.Metadata
		if string(m.Payload) != "hello business" || md.Get(pipeline.MetaMid) != "42" || md.Get(pipeline.MetaKey) != "up" ||
			md.Get(pipeline.MetaSeq) != strconv.Itoa(int(seq)) || md.Get(pipeline.MetaRooms) != "live://1,live://2" {
			t.Fatalf("upstream message %q metadata %v", m.Payload, md)
		}
	case <-time.After(wait):
		t.Fatal("no upstream message published")
	}
}

func TestSameKeyReplacesOldConnection(t *testing.T) {
	h := start(t)
	old := h.connect("ws", token.Claims{Mid: 1, Key: "dup"})
	fresh := h.connect("tcp", token.Claims{Mid: 1, Key: "dup"})
	if err := expectClosed(t, "replaced connection", old); client.CloseCode(err) != 4009 {
		t.Fatalf("old connection closed with %v, want 4009", err)
	}
	body := uniq("to the new one")
	h.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"dup"}}, body: body})
	expect(t, "new connection", fresh, 1000, body)
}

func TestMissedHeartbeatsCloseTheConnection(t *testing.T) {
	tests := []struct {
		name     string
		interval time.Duration
	}{
		// Two missed intervals are under a second: the reader blocks in
		// a read that times out.
		{"reader waits in a read", 100 * time.Millisecond},
		// Over a second: idle connections are parked without a reader and
		// woken by a timer at the deadline; every heartbeat of the live
		// client wakes its reader and parks it again.
		{"parked connection", 600 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := start(t, "cloud.heartbeat_interval="+tt.interval.String(), "cloud.handshake_timeout=100ms")
			quiet := h.connect("ws", token.Claims{Mid: 1})
			alive := h.connect("tcp", token.Claims{Mid: 2, Key: "alive"})
			start := time.Now()
			// The live client heartbeats until the quiet one has been closed.
			closed := make(chan error, 1)
			go func() { closed <- expectClosedErr(quiet) }()
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for done := false; !done; {
				select {
				case err := <-closed:
					if err == nil {
						t.Fatal("quiet client received a packet instead of being closed")
					}
					done = true
				case <-tick.C:
					if _, err := alive.Send(wire.OpHeartbeat, nil); err != nil {
						t.Fatal(err)
					}
					expect(t, "heartbeat reply", alive, wire.OpHeartbeatReply, "\x00\x00\x00\x00")
				case <-time.After(wait):
					t.Fatal("quiet client was not closed")
				}
			}
			if d := time.Since(start); d < 2*tt.interval {
				t.Fatalf("closed after %s, before two heartbeat intervals passed", d)
			}
			body := uniq("alive")
			h.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"alive"}}, body: body})
			expect(t, "heartbeating client", alive, 1000, body)
		})
	}
}

// expectClosedErr reads one packet; it returns nil if one arrived.
func expectClosedErr(c *client.Conn) error {
	_ = c.SetReadDeadline(time.Now().Add(wait))
	_, err := c.Read()
	return err
}

func TestDisconnectedKeyIsReportedOffline(t *testing.T) {
	h := start(t)
	c := h.connect("ws", token.Claims{Mid: 11, Key: "leaver"})
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(wait)
	for {
		rep := h.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"leaver"}}, body: "x"})
		if strings.Contains(string(rep.Data), `"offline_keys":["leaver"]`) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("key still online %s after its client left: %s", wait, rep.Data)
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
	}
}
