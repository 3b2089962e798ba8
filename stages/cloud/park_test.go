//go:build linux

package cloud

import (
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"imcloud/pipeline/config"
	"imcloud/proto/client"
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

// gapConn is a socket whose registration with the parker is preceded by
// gap: what may happen between park publishing the resume and the
// socket's registration.
type gapConn struct {
	*net.TCPConn
	gap func()
}

func (c gapConn) SyscallConn() (syscall.RawConn, error) {
	raw, err := c.TCPConn.SyscallConn()
	return gapRaw{RawConn: raw, gap: c.gap}, err
}

type gapRaw struct {
	syscall.RawConn
	gap func()
}

func (r gapRaw) Control(f func(uintptr)) error {
	r.gap()
	return r.RawConn.Control(f)
}

// tcpPair is both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (server, peer *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(); _ = s.Close() })
	return s.(*net.TCPConn), c.(*net.TCPConn)
}

// A connection has one reader. A server-side close between park
// publishing the resume and registering the socket wakes the connection
// (starting its next reader) and makes the registration fail: park must
// then report the connection handed off, so that the parking reader
// stops. On main 4773376 park reported false there and both read.
func TestParkGapHasOneOwner(t *testing.T) {
	for _, tc := range []struct {
		name        string
		wake, close bool // in the gap
		handedOff   bool
	}{
		{name: "close wakes in the gap", wake: true, close: true, handedOff: true},
		{name: "wake in the gap, socket open", wake: true, handedOff: true},
		{name: "socket closed in the gap, nobody woke", close: true, handedOff: false},
		{name: "nothing in the gap", handedOff: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := newParker()
			if err != nil {
				t.Fatal(err)
			}
			defer p.close()
			server, peer := tcpPair(t)
			const id = 42
			conn := gapConn{TCPConn: server, gap: func() {
				if tc.wake {
					p.wake(id)
				}
				if tc.close {
					_ = server.Close()
				}
			}}
			ran := make(chan struct{}, 2)
			got := p.park(conn, id, true, func() { ran <- struct{}{} })
			if got != tc.handedOff {
				t.Fatalf("park reported handed off = %v, want %v", got, tc.handedOff)
			}
			if !got {
				// The caller kept the connection: nobody else may run it,
				// now or later.
				p.wake(id)
				if p.count() != 0 || len(ran) != 0 {
					t.Fatalf("not handed off, yet parked %d and resumed %d times", p.count(), len(ran))
				}
				return
			}
			if !tc.wake {
				// Parked for real: the client sending wakes it.
				if _, err := peer.Write([]byte("x")); err != nil {
					t.Fatal(err)
				}
			}
			select {
			case <-ran:
			case <-time.After(wait):
				t.Fatal("a handed-off connection was never resumed")
			}
			// Whatever else arrives for id now (the socket turning readable,
			// a timer, another close) finds nothing to run: the resume left
			// the parker when it was taken, and only a take runs it.
			if _, err := peer.Write([]byte("y")); err != nil {
				t.Fatal(err)
			}
			p.wake(id)
			if p.count() != 0 {
				t.Fatalf("%d still parked after the resume", p.count())
			}
			if len(ran) != 0 {
				t.Fatal("one park resumed twice")
			}
		})
	}
}

// Closing the parker resumes what is still parked, so that no session is
// stranded, and no connection parks afterwards.
func TestParkerCloseResumesParked(t *testing.T) {
	p, err := newParker()
	if err != nil {
		t.Fatal(err)
	}
	server, _ := tcpPair(t)
	ran := make(chan struct{}, 1)
	if !p.park(server, 1, true, func() { ran <- struct{}{} }) {
		t.Fatal("park refused an idle socket")
	}
	p.close()
	select {
	case <-ran:
	case <-time.After(wait):
		t.Fatal("parked connection not resumed by close")
	}
	if p.park(server, 1, false, func() { t.Error("resumed after close") }) {
		t.Fatal("parked after close")
	}
	if p.count() != 0 {
		t.Fatalf("%d parked after close", p.count())
	}
}
