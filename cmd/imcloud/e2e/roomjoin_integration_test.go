//go:build integration

package e2e

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/proto/wire"
	"imcloud/stages/logic/token"
)

// TestIntegrationRoomPushRightAfterJoin: with the Redis registry, a room
// push accepted right after a client joined a room new to its node (in
// its token, or by op 12) reaches it. job kept the node list for a tenth
// of cloud.renew_interval and routed room pushes by it, so a push in the
// first second after such a join went to no node: found by the
// TypeScript SDK's restart test, 5 of 5 room pushes lost.
func TestIntegrationRoomPushRightAfterJoin(t *testing.T) {
	prefix := redisPrefix(t)
	h := start(t, "registry.kind=redis", "registry.redis.prefix="+prefix)
	const rounds = 20
	for i := range rounds {
		for _, how := range []string{"token", "op 12"} {
			room := fmt.Sprintf("join://%d-%s", i, map[string]string{"token": "t", "op 12": "j"}[how])
			claims := token.Claims{Mid: int64(100 + i), Rooms: []string{room}}
			if how == "op 12" {
				claims.Rooms = []string{"join://*"}
			}
			c := h.connect("ws", claims)
			if how == "op 12" {
				if _, err := c.Send(wire.OpChangeRoom, []byte(room)); err != nil {
					t.Fatal(err)
				}
				for {
					p, err := c.Read()
					if err != nil {
						t.Fatalf("op 12: %v", err)
					}
					if p.Op == wire.OpChangeRoomReply {
						break
					}
				}
			}
			typ, id, _ := strings.Cut(room, "://")
			body := fmt.Sprintf("%s %d", how, i)
			h.push(request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "type": {typ}, "room": {id}}, body: body})
			for {
				p, err := c.Read()
				if err != nil {
					t.Fatalf("round %d (%s): the push right after the join did not arrive: %v", i, how, err)
				}
				if p.Op == 1000 {
					if string(p.Body) != body {
						t.Fatalf("round %d (%s): got %q, want %q", i, how, p.Body, body)
					}
					break
				}
			}
			_ = c.Close()
		}
	}
}

// redisPrefix is a key prefix of the test's own on the local Redis; its
// keys are deleted when the test ends.
func redisPrefix(t *testing.T) string {
	prefix := uniq("imcloud:test") + ":"
	t.Cleanup(func() {
		rdb := goredis.NewClient(&goredis.Options{Addr: "127.0.0.1:6379"})
		defer rdb.Close()
		ctx := context.Background()
		if keys, _ := rdb.Keys(ctx, prefix+"*").Result(); len(keys) > 0 {
			rdb.Del(ctx, keys...)
		}
	})
	return prefix
}
