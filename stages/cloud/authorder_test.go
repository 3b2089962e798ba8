package cloud

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"

	"imcloud/pipeline/config"
	"imcloud/proto/pb"
)

// TestAuthReplyComesFirst: a key that reconnects while pushes to it keep
// coming (job retrying its backlog the moment it is back) reads op 8
// before anything else. The reply used to be queued after the connection
// was put in its bucket, and a push in between came first: the client
// took it for a refused auth (seen in the restart integration test).
func TestAuthReplyComesFirst(t *testing.T) {
	// Queues large enough that the pushes never make it a slow consumer.
	n := startNode(t, func(c *config.Cloud) { c.SendQueue, c.SendQueueBytes = 1<<20, 1<<30 })
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			req := &pb.PushMsgReq{Keys: []string{"k"}, Proto: &pb.Proto{Op: 1000, Body: []byte("backlog")}}
			for {
				select {
				case <-stop:
					return
				default:
				}
				_, _ = n.rpc.PushMsg(context.Background(), req)
			}
		})
	}
	defer func() { close(stop); wg.Wait() }()
	tok, _ := json.Marshal(claims{Mid: 1, Key: "k"})
	for i := range 300 {
		c := n.dial(t, []string{"tcp", "ws"}[i%2], nil)
		_, err := c.Auth(tok)
		_ = c.Close()
		if err != nil {
			t.Fatal(fmt.Errorf("connection %d: %w", i, err))
		}
	}
}
