package cloud

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/wire"
)

// refusedAtOnce checks that the node closes a connection from local to
// target without waiting for it to authenticate: the dial, the WebSocket
// upgrade or the auth ends with EOF or a reset well before the handshake
// timeout (a minute in these tests), never with a timeout.
func refusedAtOnce(t *testing.T, target, local string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
	c, err := client.Dial(ctx, target, client.Options{Dialer: d})
	if err == nil {
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Auth([]byte(`{"mid":99}`))
	}
	var ne net.Error
	if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		t.Fatalf("connection to %s over the limit: %v, want it closed at once", target, err)
	}
}

// dialFrom connects to target from the loopback address local.
func dialFrom(t *testing.T, target, local string) (*client.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
	c, err := client.Dial(ctx, target, client.Options{Dialer: d})
	if err == nil {
		t.Cleanup(func() { _ = c.Close() })
		_ = c.SetReadDeadline(time.Now().Add(wait))
	}
	return c, err
}

// TestMaxConnsRefusesBeyondCap: with cloud.max_conns at 3 (two clients
// and one connection that has not authenticated), a fourth connection,
// TCP or WebSocket, is closed as soon as it is accepted; the clients in
// still get pushes and heartbeat replies, and once one leaves a new
// client gets in. On main 4773376 there was no cap: one token held every
// descriptor the process had.
func TestMaxConnsRefusesBeyondCap(t *testing.T) {
	for _, over := range []string{"tcp", "ws"} {
		t.Run(over, func(t *testing.T) {
			n := startNode(t, func(c *config.Cloud) { c.MaxConns = 3; c.HandshakeTimeout = time.Minute })
			a := n.connect(t, "tcp", claims{Mid: 1, Key: "a", Rooms: []string{"live://cap"}})
			b := n.connect(t, "ws", claims{Mid: 2, Key: "b", Rooms: []string{"live://cap"}})
			pending := n.dial(t, "tcp", nil)
			waitFor(t, "three connections counted", func() bool { return n.st.limits.open.Load() == 3 })

			refusedAtOnce(t, n.target(over), "127.0.0.1")
			if got := n.st.RefusedConns(); got != 1 {
				t.Fatalf("refused %d connections, want 1", got)
			}

			if got := n.room(t, "live://cap", 1000, []byte("still served")); got != 2 {
				t.Fatalf("push delivered to %d, want 2", got)
			}
			for name, c := range map[string]*client.Conn{"tcp": a, "ws": b} {
				if p, err := c.Read(); err != nil || string(p.Body) != "still served" {
					t.Fatalf("%s client: %+v %v", name, p, err)
				}
				call(t, c, wire.OpHeartbeat, "")
			}

			// The connection that never authenticated leaves; its place
			// is free for a new client.
			_ = pending.Close()
			waitFor(t, "the leaving connection counted out", func() bool { return n.st.limits.open.Load() == 2 })
			call(t, n.connect(t, over, claims{Mid: 3, Key: "c"}), wire.OpHeartbeat, "")
		})
	}
}

// TestMaxHandshakesPerIP: one address may hold cloud.max_handshakes_per_ip
// connections that have not authenticated; one more from it is closed at
// once, while another address (127.0.0.2) still gets in, and a
// connection that authenticates frees its place. The count of an address
// goes when it reaches zero. On main one address could hold every
// descriptor with half-open connections for the handshake timeout.
func TestMaxHandshakesPerIP(t *testing.T) {
	n := startNode(t, func(c *config.Cloud) { c.MaxHandshakesPerIP = 2; c.HandshakeTimeout = time.Minute })
	var held []*client.Conn
	for range 2 {
		c, err := dialFrom(t, n.tcpAddr, "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	waitFor(t, "two handshakes counted", func() bool { return n.st.limits.open.Load() == 2 })

	refusedAtOnce(t, n.tcpAddr, "127.0.0.1")
	refusedAtOnce(t, n.wsURL, "127.0.0.1")
	if got := n.st.RefusedConns(); got != 2 {
		t.Fatalf("refused %d connections, want 2", got)
	}

	for _, target := range []string{n.tcpAddr, n.wsURL} {
		other, err := dialFrom(t, target, "127.0.0.2")
		if err != nil {
			t.Fatalf("another address: %v", err)
		}
		if _, err := other.Auth([]byte(fmt.Sprintf(`{"mid":2,"key":"other-%d"}`, len(target)))); err != nil {
			t.Fatalf("another address: %v", err)
		}
	}

	// One of the held connections authenticates: its address has room
	// for one more handshake.
	if _, err := held[0].Auth([]byte(`{"mid":1,"key":"held"}`)); err != nil {
		t.Fatal(err)
	}
	again, err := dialFrom(t, n.tcpAddr, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	call(t, authed(t, again, `{"mid":3,"key":"again"}`), wire.OpHeartbeat, "")

	_ = held[1].Close()
	waitFor(t, "the address's handshake count removed", func() bool {
		n.st.limits.mu.Lock()
		defer n.st.limits.mu.Unlock()
		return len(n.st.limits.handshaking) == 0
	})
}

func authed(t *testing.T, c *client.Conn, token string) *client.Conn {
	t.Helper()
	if _, err := c.Auth([]byte(token)); err != nil {
		t.Fatalf("auth: %v", err)
	}
	return c
}

// TestAddrKey: handshakes are counted per IPv4 address and per IPv6 /64.
func TestAddrKey(t *testing.T) {
	for _, tc := range []struct {
		addr string
		want string
	}{
		{"127.0.0.1:5", "127.0.0.1/32"},
		{"[::ffff:10.1.2.3]:5", "10.1.2.3/32"},
		{"[2001:db8:1:2:3:4:5:6]:5", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2:ffff::1]:7", "2001:db8:1:2::/64"},
	} {
		ap := netip.MustParseAddrPort(tc.addr)
		got := addrKey(net.TCPAddrFromAddrPort(ap))
		if got.String() != tc.want {
			t.Errorf("addrKey(%s) = %s, want %s", tc.addr, got, tc.want)
		}
	}
}

// TestConnReserve: the descriptors cloud.max_conns = 0 leaves to the rest
// of the process.
func TestConnReserve(t *testing.T) {
	for _, tc := range []struct{ limit, reserve uint64 }{
		{48, 24}, {200, 100}, {1024, 256}, {4096, 409}, {65536, 6553}, {1 << 20, 104857},
	} {
		if got := connReserve(tc.limit); got != tc.reserve {
			t.Errorf("connReserve(%d) = %d, want %d", tc.limit, got, tc.reserve)
		}
	}
	// A configured cap is used as it is.
	if got := maxConns(7, slog.New(slog.DiscardHandler)); got != 7 {
		t.Errorf("maxConns(7) = %d", got)
	}
}
