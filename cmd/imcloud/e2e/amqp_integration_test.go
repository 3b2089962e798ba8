//go:build integration

package e2e

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"

	nc "github.com/nats-io/nats.go"
	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters/amqp/amqptest"
	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/stages/logic/token"
)

func amqpURL() string {
	if u := os.Getenv("IMCLOUD_TEST_AMQP_URL"); u != "" {
		return u
	}
	return config.Default().Broker.AMQP.URL
}

// amqpTopics gives the test its own queues and deletes them afterwards, so
// runs never see each other's messages.
func amqpTopics(t *testing.T) []string { return shardedTopics(t, 1) }

// shardedTopics are amqpTopics with topics.push_shards = n: the shard
// queues are the test's own too.
func shardedTopics(t *testing.T, n int) []string {
	t.Helper()
	p := uniq("imcloud.test")
	topics := config.Topics{Push: p + ".push", Poison: p + ".poison", Upstream: p + ".upstream", PushShards: n}
	amqptest.DeleteAtEnd(t, amqpURL(), append(topics.PushTopics(), topics.Poison, topics.Upstream)...)
	return []string{
		"broker.kind=amqp", "broker.amqp.url=" + amqpURL(),
		"topics.push=" + topics.Push, "topics.poison=" + topics.Poison, "topics.upstream=" + topics.Upstream,
		"topics.push_shards=" + strconv.Itoa(n),
	}
}

// readBodies reads n business packets from c and counts each body.
func readBodies(t *testing.T, name string, c *client.Conn, n int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for range n {
		p, err := c.Read()
		if err != nil {
			t.Fatalf("%s: after %d of %d messages: %v", name, len(got), n, err)
		}
		got[string(p.Body)]++
	}
	return got
}

// brokerTopics gives a test its own topics on the broker kind and removes
// them afterwards.
func brokerTopics(t *testing.T, kind string) []string {
	t.Helper()
	if kind == "amqp" {
		return amqpTopics(t)
	}
	p := uniq("imcloud.test")
	names := []string{p + ".push", p + ".poison", p + ".upstream"}
	t.Cleanup(func() {
		switch kind {
		case "nats":
			conn, err := nc.Connect(config.Default().Broker.NATS.URL)
			if err != nil {
				return
			}
			defer conn.Close()
			if js, err := conn.JetStream(); err == nil {
				for _, n := range names {
					_ = js.DeleteStream(strings.ReplaceAll(n, ".", "_"))
				}
			}
		case "redisstream":
			rdb := goredis.NewClient(&goredis.Options{Addr: config.Default().Broker.RedisStream.Addr})
			defer rdb.Close()
			rdb.Del(context.Background(), names...)
		}
	})
	return []string{"broker.kind=" + kind, "topics.push=" + names[0], "topics.poison=" + names[1], "topics.upstream=" + names[2]}
}

// TestIntegrationSplitStages runs logic+cloud and job as two nodes that
// share nothing but the broker and gRPC, the way `imcloud run --stages`
// deploys them, on each broker kind, and checks every push arrives
// exactly once.
func TestIntegrationSplitStages(t *testing.T) {
	for _, kind := range []string{"amqp", "nats", "redisstream"} {
		t.Run(kind, func(t *testing.T) { splitStages(t, kind) })
	}
}

func splitStages(t *testing.T, kind string) {
	topics := brokerTopics(t, kind)
	front := start(t, append(topics, "stages=logic,cloud")...)
	start(t, append(topics, "stages=job", "job.cloud_addrs="+front.addrs.CloudGRPC)...)

	ws := front.connect("ws", token.Claims{Mid: 1, Key: "amqp-ws", Rooms: []string{"live://amqp"}})
	tcp := front.connect("tcp", token.Claims{Mid: 2, Key: "amqp-tcp", Rooms: []string{"live://amqp"}})

	const perRoute = 300
	want := map[string]int{}
	for i := range perRoute {
		body := fmt.Sprintf("key-%d", i)
		front.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"amqp-ws", "amqp-tcp"}}, body: body})
		want[body] = 1
		body = fmt.Sprintf("room-%d", i)
		front.push(request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "type": {"live"}, "room": {"amqp"}}, body: body})
		want[body] = 1
	}
	for name, c := range map[string]*client.Conn{"ws": ws, "tcp": tcp} {
		got := readBodies(t, name, c, len(want))
		for body, n := range want {
			if got[body] != n {
				t.Errorf("%s: %q arrived %d times, want %d", name, body, got[body], n)
			}
		}
	}
}
