//go:build linux

package cloud

import (
	"fmt"
	"testing"

	"imcloud/client"
	"imcloud/config"
	"imcloud/proto/wire"
)

// Idle clients wait without a reader; whatever they send, whatever is
// pushed to them and whatever closes them still works.
func TestIdleConnectionsPark(t *testing.T) {
	for _, transport := range []string{"ws", "tcp"} {
		t.Run(transport, func(t *testing.T) {
			n := startNode(t, func(*config.Cloud) {})
			if n.st.parker == nil {
				t.Fatal("no parker on Linux")
			}
			const clients = 20
			conns := make([]*client.Conn, clients)
			for i := range conns {
				conns[i] = n.connect(t, transport, claims{Mid: int64(i + 1), Key: fmt.Sprint("k", i), Rooms: []string{"live://park"}})
			}
			waitFor(t, "every idle client to park", func() bool { return n.st.parker.count() == clients })

			// A parked client's heartbeat wakes its reader, which answers
			// and parks again.
			for round := range 3 {
				if _, err := conns[0].Send(wire.OpHeartbeat, nil); err != nil {
					t.Fatal(err)
				}
				p, err := conns[0].Read()
				if err != nil || p.Op != wire.OpHeartbeatReply {
					t.Fatalf("heartbeat %d: reply %+v, %v", round, p, err)
				}
				waitFor(t, "the woken reader to park again", func() bool { return n.st.parker.count() == clients })
			}

			// Pushes reach parked clients: the write side has no reader.
			if got := n.room(t, "live://park", 1000, []byte("to the parked")); got != clients {
				t.Fatalf("room push reached %d, want %d", got, clients)
			}
			for i, c := range conns {
				p, err := c.Read()
				if err != nil || p.Op != 1000 || string(p.Body) != "to the parked" {
					t.Fatalf("client %d: %+v, %v", i, p, err)
				}
			}

			// The server closing a parked connection (a new one with its
			// key) ends its session: unregistered and reported to logic.
			n.connect(t, transport, claims{Mid: 1, Key: "k0"})
			if _, err := conns[0].Read(); err == nil {
				t.Fatal("replaced client still open")
			}
			waitFor(t, "the replaced and the new session to settle", func() bool { return n.st.parker.count() == clients })
			if d := n.logic.disconnected("k0"); d != 0 {
				t.Fatalf("replaced session reported gone %d times: the key is still online", d)
			}

			// A client leaving while parked wakes its reader with EOF.
			_ = conns[1].Close()
			waitFor(t, "the departed client to be reported", func() bool { return n.logic.disconnected("k1") == 1 })
			waitFor(t, "the departed client to leave the parker", func() bool { return n.st.parker.count() == clients-1 })
		})
	}
}
