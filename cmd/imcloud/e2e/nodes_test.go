package e2e

import (
	"encoding/binary"
	"net/url"
	"testing"
	"time"

	"imcloud/proto/client"
	"imcloud/proto/wire"
	"imcloud/stages/logic/token"
)

// TestTwoCloudNodes runs a second cloud node against the first node's
// logic: job finds it through its registration, pushes reach clients on
// both nodes, and heartbeats report the room's count across both.
func TestTwoCloudNodes(t *testing.T) {
	a := start(t, "cloud.renew_interval=50ms")
	b := start(t, "stages=cloud", "cloud.renew_interval=50ms", "cloud.logic_addr="+a.addrs.LogicGRPC)

	onA := a.connect("ws", token.Claims{Mid: 1, Key: "on-a", Rooms: []string{"live://both"}})
	onB := b.connect("tcp", token.Claims{Mid: 2, Key: "on-b", Rooms: []string{"live://both"}})

	body := uniq("room on both nodes")
	a.push(request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "type": {"live"}, "room": {"both"}}, body: body})
	expect(t, "client on node a", onA, 1000, body)
	expect(t, "client on node b", onB, 1000, body)

	body = uniq("key on node b")
	a.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"on-b"}}, body: body})
	expect(t, "client on node b", onB, 1000, body)

	// Each node learns the cluster-wide count at its next report.
	deadline := time.Now().Add(wait)
	for {
		if n := heartbeatCount(t, onA); n == 2 {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("heartbeat on node a reports %d in the room, want 2 across both nodes", n)
		}
		time.Sleep(20 * time.Millisecond) // polling a condition, with a deadline
	}
}

func heartbeatCount(t *testing.T, c *client.Conn) uint32 {
	t.Helper()
	if _, err := c.Send(wire.OpHeartbeat, nil); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	p, err := c.Read()
	if err != nil || p.Op != wire.OpHeartbeatReply {
		t.Fatalf("heartbeat reply %+v, %v", p, err)
	}
	return binary.BigEndian.Uint32(p.Body)
}

// TestKeyReconnectingOnAnotherNode: a key that connects on a second node
// closes its connection on the first, and pushes follow it.
func TestKeyReconnectingOnAnotherNode(t *testing.T) {
	a := start(t)
	b := start(t, "stages=cloud", "cloud.logic_addr="+a.addrs.LogicGRPC)
	old := a.connect("ws", token.Claims{Mid: 1, Key: "roamer"})
	moved := b.connect("tcp", token.Claims{Mid: 1, Key: "roamer"})
	if err := expectClosed(t, "connection on the first node", old); client.CloseCode(err) != 4009 {
		t.Fatalf("old connection closed with %v, want 4009", err)
	}
	body := uniq("follows the key")
	a.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"roamer"}}, body: body})
	expect(t, "connection on the second node", moved, 1000, body)
}
