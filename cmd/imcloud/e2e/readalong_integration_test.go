//go:build integration

package e2e

import (
	"sync"
	"testing"
	"time"

	"imcloud/proto/client"
	"imcloud/proto/wire"
)

// readAlong reads each client's packets on a goroutine of its own for the
// rest of the test, handing each to got (i: the client's index), so that
// none falls behind (4008); with heartbeat above 0 it also sends each a
// heartbeat that often. The readers block — a read deadline breaks a
// WebSocket connection for good — and end when the test's cleanup closes
// the connections, before the test ends: one reporting after the end
// fails the whole binary. A read error before that, or an error from got,
// fails the test.
func readAlong(t *testing.T, conns []*client.Conn, heartbeat time.Duration, got func(i int, p wire.Packet) error) {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	report := func(format string, args ...any) {
		select {
		case <-stop:
		default:
			t.Errorf(format, args...)
		}
	}
	for i, c := range conns {
		if heartbeat > 0 {
			wg.Go(func() {
				tick := time.NewTicker(heartbeat)
				defer tick.Stop()
				for {
					select {
					case <-stop:
						return
					case <-tick.C:
					}
					if _, err := c.Send(wire.OpHeartbeat, nil); err != nil {
						report("client %d: heartbeat: %v", i, err)
						return
					}
				}
			})
		}
		wg.Go(func() {
			for {
				_ = c.SetReadDeadline(time.Now().Add(time.Minute))
				p, err := c.Read()
				if err == nil {
					err = got(i, p)
				}
				if err != nil {
					report("client %d: %v", i, err)
					return
				}
			}
		})
	}
	t.Cleanup(func() {
		close(stop)
		for _, c := range conns {
			_ = c.Close()
		}
		wg.Wait()
	})
}
