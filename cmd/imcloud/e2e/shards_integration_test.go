//go:build integration

package e2e

import (
	"fmt"
	"net/url"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"imcloud/pipeline"
	"imcloud/proto/client"
	"imcloud/proto/wire"
	"imcloud/stages/logic"
	"imcloud/stages/logic/token"
)

// shardCount is the push shards of these tests: the N = 4.
const shardCount = 4

// startJobs starts n job processes of bin consuming every shard of sets,
// delivering to the cloud node at cloudAddr.
func startJobs(t *testing.T, bin, cloudAddr string, n int, sets []string) ([]*proc, []string) {
	t.Helper()
	args := []string{"run", "--stages", "job", "--set", "job.cloud_addrs=" + cloudAddr, "--set", "job.dedupe.store=redis"}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	jobs := make([]*proc, n)
	for i := range jobs {
		jobs[i] = startProc(t, bin, args...)
	}
	return jobs, args
}

// shardConsumers waits until each shard queue of push has want consumers
// (every job reads every shard).
func shardConsumers(t *testing.T, sets []string, want int) {
	t.Helper()
	var push string
	for _, s := range sets {
		if v, ok := strings.CutPrefix(s, "topics.push="); ok {
			push = v
		}
	}
	waitFor(t, fmt.Sprintf("%d consumers on each of %d shard queues", want, shardCount), func() bool {
		out, err := exec.Command("rabbitmqctl", "-q", "list_queues", "name", "consumers").Output()
		if err != nil {
			t.Fatalf("rabbitmqctl list_queues: %v", err)
		}
		n := 0
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) == 2 && strings.HasPrefix(f[0], push+".") && f[1] == strconv.Itoa(want) {
				n++
			}
		}
		return n == shardCount
	})
}

// TestIntegrationShardedOrder is issue 16's order promise across shards:
// with topics.push_shards = 4 on RabbitMQ and three job processes
// consuming every shard (competing for each shard's messages), 2,000
// sequential pushes to each of two rooms and two users, whose streams are
// on different shards, reach every client once, in push order, at the
// positions their replies gave.
func TestIntegrationShardedOrder(t *testing.T) {
	bin := buildBinary(t)
	sets := shardedTopics(t, shardCount)
	front := start(t, append(sets, "stages=logic,cloud",
		"history.rooms.live.size="+strconv.Itoa(2*orderPushes), "history.user.size="+strconv.Itoa(2*orderPushes))...)
	startJobs(t, bin, front.addrs.CloudGRPC, 3, sets)
	shardConsumers(t, sets, 3*4) // job.concurrency 4 each

	type target = orderTarget
	// Two rooms and two users, each on a shard of its own.
	var targets []*target
	used := map[int]bool{}
	for i := 0; len(targets) < 2; i++ {
		room := "live://order-" + strconv.Itoa(i)
		if s := pipeline.ShardOf(pipeline.RoomStream(room), shardCount); !used[s] {
			used[s] = true
			targets = append(targets, &target{name: room, prefix: "r" + strconv.Itoa(i), stream: pipeline.RoomStream(room), path: "/im/push/room",
				query: url.Values{"operation": {strconv.Itoa(orderOp)}, "type": {"live"}, "room": {strings.TrimPrefix(room, "live://")}}})
		}
	}
	used = map[int]bool{}
	for mid := int64(700); len(targets) < 4; mid++ {
		if s := pipeline.ShardOf(pipeline.UserStream(mid), shardCount); !used[s] {
			used[s] = true
			targets = append(targets, &target{name: "user " + strconv.FormatInt(mid, 10), prefix: "m" + strconv.FormatInt(mid, 10), stream: pipeline.UserStream(mid),
				path: "/im/push/mids", query: url.Values{"operation": {strconv.Itoa(orderOp)}, "mids": {strconv.FormatInt(mid, 10)}}})
		}
	}
	for i, tg := range targets {
		claims := func(n int, recover bool) jwt.MapClaims {
			c := jwt.MapClaims{"key": fmt.Sprintf("shard-order-%d-%d", i, n), "exp": time.Now().Add(time.Hour).Unix()}
			if room, ok := strings.CutPrefix(tg.stream, "room:"); ok {
				c["mid"], c["rooms"] = 100+i*10+n, []string{room}
			} else {
				c["mid"], _ = strconv.Atoi(strings.TrimPrefix(tg.stream, "user:"))
			}
			if recover {
				c["recover"] = true
			}
			return c
		}
		tg.clients = []*orderClient{
			front.orderClient(t, tg.name+" ws", "ws", claims(0, false), false),
			front.orderClient(t, tg.name+" ws opted in", "ws", claims(1, true), true),
		}
	}

	var wg sync.WaitGroup
	for _, tg := range targets {
		for _, c := range tg.clients {
			wg.Go(func() { c.read(tg.prefix, tg.stream, orderPushes) })
		}
	}
	replies := make([][]logic.Position, len(targets))
	errs := make([]error, len(targets))
	began := time.Now()
	for i, tg := range targets {
		wg.Go(func() {
			replies[i], errs[i] = tg.pushAll(front.addrs.HTTP, orderPushes)
		})
	}
	wg.Wait()
	t.Logf("%d pushes to each of %d streams on %d shards, 3 jobs: %s", orderPushes, len(targets), shardCount, time.Since(began))
	for i, tg := range targets {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		for _, c := range tg.clients {
			c.check(t, replies[i])
		}
	}
}

// TestIntegrationShardedJobKilled: with four shards and three job
// processes, one job is SIGKILLed while pushes to users on every shard
// flow; the others consume its shards (and what it held unacked comes
// back to them), and every push answered 200 is delivered.
func TestIntegrationShardedJobKilled(t *testing.T) {
	bin := buildBinary(t)
	sets := shardedTopics(t, shardCount)
	front := start(t, append(sets, "stages=logic,cloud")...)
	jobs, _ := startJobs(t, bin, front.addrs.CloudGRPC, 3, sets)
	shardConsumers(t, sets, 3*4)

	// Eight users, at least one on each shard; a push to all their keys
	// is split into a message per shard.
	var keys []string
	var conns []*client.Conn
	shards := map[int]bool{}
	for mid := int64(1); len(keys) < 8 || len(shards) < shardCount; mid++ {
		shards[pipeline.ShardOf(pipeline.UserStream(mid), shardCount)] = true
		k := "shard-kill-" + strconv.FormatInt(mid, 10)
		keys = append(keys, k)
		conns = append(conns, front.connect("ws", token.Claims{Mid: mid, Key: k}))
	}
	// Each client is read all along (readAlong).
	type seen struct {
		mu  sync.Mutex
		got map[string]int
	}
	reads := make([]*seen, len(conns))
	for i := range reads {
		reads[i] = &seen{got: map[string]int{}}
	}
	readAlong(t, conns, 0, func(i int, p wire.Packet) error {
		if p.Op == orderOp || strings.HasPrefix(string(p.Body), "kill-") {
			reads[i].mu.Lock()
			reads[i].got[string(p.Body)]++
			reads[i].mu.Unlock()
		}
		return nil
	})

	var accepted atomic.Int64
	stop := make(chan struct{})
	done := stream(t, front, "kill", stop, &accepted, keys...)
	waitFor(t, "pushes to flow", func() bool { return accepted.Load() >= 500 })
	jobs[1].kill()
	waitFor(t, "pushes after the kill", func() bool { return accepted.Load() >= 1500 })
	close(stop)
	ok, refused := done()

	missing := func() int {
		n := 0
		for _, r := range reads {
			r.mu.Lock()
			for _, b := range ok {
				if r.got[b] == 0 {
					n++
				}
			}
			r.mu.Unlock()
		}
		return n
	}
	deadline := time.Now().Add(3 * wait)
	for missing() > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond) // waiting on deliveries, with a deadline
	}
	if m := missing(); m > 0 {
		t.Fatalf("%d of %d deliveries (%d pushes × %d clients) missing after a job was killed", m, len(ok)*len(conns), len(ok), len(conns))
	}
	dups := 0
	for _, r := range reads {
		r.mu.Lock()
		dups += repeats(r.got)
		r.mu.Unlock()
	}
	t.Logf("%d pushes accepted (%d refused), each to %d users on %d shards; all delivered after a job's SIGKILL; %d deliveries twice (at-least-once across a kill)",
		len(ok), refused, len(conns), len(shards), dups)
}
