package cloud

import (
	"context"
	"encoding/json"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// TestReplacementStorm: two connections holding one token (one key)
// replace each other (4009) and reconnect as fast as they can, while the
// key is closed from "another node" and pushed to. Every server-side close
// races the reader parking. On main 4773376 this panicked with "sync:
// negative WaitGroup counter" in endSession within seconds, and -race
// reported two goroutines running reader.run on one connection. The node
// must come out of it serving: a third client connects, is heard and
// pushed to, and draining finds every session ended exactly once.
func TestReplacementStorm(t *testing.T) {
	// The issue asks for 30 s; -short keeps the storm but shortens it.
	duration := 30 * time.Second
	if testing.Short() {
		duration = 5 * time.Second
	}
	n := startNode(t, func(*config.Cloud) {})
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()

	var sessions atomic.Int64 // authenticated storm connections
	var wg sync.WaitGroup
	storm := func(key, transport string, chatty bool) {
		tok, _ := json.Marshal(claims{Mid: 7, Key: key, Rooms: []string{"live://storm"}})
		for ctx.Err() == nil {
			c, err := client.Dial(ctx, n.target(transport), client.Options{})
			if err != nil {
				continue // the storm is over, or the node is briefly out of ports
			}
			stop := context.AfterFunc(ctx, func() { _ = c.Close() })
			_ = c.SetReadDeadline(time.Now().Add(wait))
			if _, err := c.Auth(tok); err == nil {
				sessions.Add(1)
				// A chatty client wakes its parked reader with heartbeats
				// while the other one closes it; a quiet one stays parked.
				for err == nil {
					if chatty {
						_, err = c.Send(wire.OpHeartbeat, nil)
					}
					if err == nil {
						_, err = c.Read()
					}
				}
			}
			stop()
			_ = c.Close()
		}
	}
	for _, s := range []struct {
		key, transport string
		chatty         bool
	}{
		{"storm-tcp", "tcp", false}, {"storm-tcp", "tcp", true},
		{"storm-mixed", "ws", false}, {"storm-mixed", "tcp", true},
	} {
		wg.Go(func() { storm(s.key, s.transport, s.chatty) })
	}
	// Closes from another node and pushes that land on closing
	// connections, paced so that the clients get to reconnect in between.
	wg.Go(func() {
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			key := []string{"storm-tcp", "storm-mixed"}[i%2]
			if i%10 == 0 {
				_, _ = n.rpc.Close(ctx, &pb.CloseReq{Key: key})
			}
			_, _ = n.rpc.PushMsg(ctx, &pb.PushMsgReq{Keys: []string{key}, Proto: &pb.Proto{Op: 1000, Body: []byte("storm")}})
		}
	})
	wg.Wait()
	if s := sessions.Load(); s < 100 {
		t.Fatalf("only %d storm sessions in %v: the storm did not happen", s, duration)
	}
	t.Logf("%d storm sessions in %v", sessions.Load(), duration)

	// The node still serves: a third client is answered and pushed to.
	third := n.connect(t, "tcp", claims{Mid: 8, Key: "third"})
	if _, err := third.Send(wire.OpHeartbeat, nil); err != nil {
		t.Fatal(err)
	}
	if p, err := third.Read(); err != nil || p.Op != wire.OpHeartbeatReply {
		t.Fatalf("heartbeat after the storm: %+v, %v", p, err)
	}
	r, err := n.rpc.PushMsg(context.Background(), &pb.PushMsgReq{Keys: []string{"third"}, Proto: &pb.Proto{Op: 1000, Body: []byte("after")}})
	if err != nil || r.Delivered != 1 {
		t.Fatalf("push after the storm: %+v, %v", r, err)
	}
	if p, err := third.Read(); err != nil || string(p.Body) != "after" {
		t.Fatalf("third client read %+v, %v", p, err)
	}

	// Every storm session unregistered; only the third client is left,
	// parked once.
	waitFor(t, "the storm sessions to be unregistered", func() bool {
		_, conns, _ := n.st.counts()
		return conns == 1
	})
	if n.st.parker != nil {
		waitFor(t, "only the third client to be parked", func() bool { return n.st.parker.count() == 1 })
	}
	// Draining ends when every session counted in has ended once: a
	// session counted out twice panics, one never counted out hangs.
	dctx, dcancel := context.WithTimeout(context.Background(), wait)
	defer dcancel()
	if err := n.st.Drain(dctx); err != nil {
		t.Fatalf("drain after the storm: %v", err)
	}
}
