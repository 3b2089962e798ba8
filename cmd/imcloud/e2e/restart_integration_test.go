//go:build integration

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"imcloud/adapters/amqp"
	"imcloud/pipeline"
	"imcloud/proto/client"
	"imcloud/stages/logic/token"
)

// topicOf returns the queue a topics.<name>=… setting names.
// poisonQueue opens the AMQP poison queue of the topics sets name, which
// replays to their push topic (one shard).
func poisonQueue(t *testing.T, sets []string) *amqp.PoisonQueue {
	t.Helper()
	pq, err := amqp.NewPoisonQueue(amqpURL(), topicOf(t, sets, "poison"), pipeline.ReplayTargets{topicOf(t, sets, "push")}, nil, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	return pq
}

func topicOf(t *testing.T, sets []string, name string) string {
	t.Helper()
	for _, s := range sets {
		if v, ok := strings.CutPrefix(s, "topics."+name+"="); ok {
			return v
		}
	}
	t.Fatalf("no topics.%s in %v", name, sets)
	return ""
}

// queueReady is how many messages queue holds ready for a consumer.
func queueReady(t *testing.T, queue string) int {
	t.Helper()
	conn, err := amqp091.Dial(amqpURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	if err != nil {
		t.Fatalf("inspect %s: %v", queue, err)
	}
	return q.Messages
}

// TestIntegrationCloudRestartWithBacklog: 1,000 pushes for a connected
// client queue in RabbitMQ while no job runs; its cloud node is killed
// with SIGKILL and restarted, job starts before the client is back, and
// the client reconnects. Every push answered online is delivered to it.
// So are 100 pushes by user id to a client whose token has no key claim,
// which gets a new key when it reconnects. A third client, which never
// comes back, had 100 pushes answered online: each of them is in the
// poison queue as "recipients offline", where `imcloud poison list` shows
// it. None is silently lost.
func TestIntegrationCloudRestartWithBacklog(t *testing.T) {
	const (
		backlog = 1000
		byMid   = 100
		stray   = 100
		grace   = 5 * time.Second
	)
	bin := buildBinary(t)
	prefix := redisPrefix(t)
	topics := amqpTopics(t)
	common := []string{"run",
		"--set", "registry.kind=redis", "--set", "registry.redis.prefix=" + prefix, "--set", "job.dedupe.store=redis",
		"--set", "logic.auth.jwt_secret=" + testSecret, "--set", "logic.api_keys=" + testAPIKey,
		"--set", "cloud.renew_interval=300ms", "--set", "logic.session_ttl=5m",
		"--set", "job.retry.initial_interval=50ms", "--set", "job.offline_grace=" + grace.String(),
	}
	for _, s := range topics {
		common = append(common, "--set", s)
	}
	args := func(extra ...string) []string { return append(slices.Clone(common), extra...) }

	logicHTTP, logicGRPC := freeAddr(t), freeAddr(t)
	startProc(t, bin, args("--stages", "logic", "--set", "logic.http_addr="+logicHTTP, "--set", "logic.grpc_addr="+logicGRPC)...)
	cloudTCP, cloudWS, cloudGRPC := freeAddr(t), freeAddr(t), freeAddr(t)
	cloudArgs := args("--stages", "cloud", "--set", "node_id=restarting",
		"--set", "cloud.tcp_addr="+cloudTCP, "--set", "cloud.ws_addr="+cloudWS, "--set", "cloud.grpc_addr="+cloudGRPC,
		"--set", "cloud.advertise_addr="+cloudGRPC, "--set", "cloud.logic_addr="+logicGRPC)
	cloud := startProc(t, bin, cloudArgs...)

	dial := func(mid int64, key string) *client.Conn {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		c, err := client.Dial(ctx, cloudTCP, client.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		_ = c.SetReadDeadline(time.Now().Add(wait))
		tok, _ := token.Sign(testSecret, token.Claims{Mid: mid, Key: key}, time.Hour)
		if _, err := c.Auth([]byte(tok)); err != nil {
			t.Fatal(err)
		}
		return c
	}
	back := dial(1, "restart-back")
	never := dial(2, "restart-never")
	keyless := dial(3, "")

	// No job runs: every push waits in RabbitMQ. One in twelve goes to
	// the client that will not return, one in twelve to user 3 by id.
	push := func(route string, q url.Values, body string) bool {
		q.Set("operation", "1000")
		req, _ := http.NewRequest(http.MethodPost, "http://"+logicHTTP+route+"?"+q.Encode(), strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+testAPIKey)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Error(err)
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var rep struct {
			Data struct {
				Online int `json:"online"`
			} `json:"data"`
		}
		if resp.StatusCode != 200 || json.Unmarshal(b, &rep) != nil {
			t.Errorf("push %v: %d %s", q, resp.StatusCode, b)
			return false
		}
		return rep.Data.Online == 1
	}
	var (
		mu         sync.Mutex
		onlineBack []string
		onlineMid  []string
		onlineGone []string
		wg         sync.WaitGroup
	)
	next := make(chan int)
	go func() {
		for i := range backlog + byMid + stray {
			next <- i
		}
		close(next)
	}()
	for range 16 {
		wg.Go(func() {
			for i := range next {
				route, q, list := "/im/push/keys", url.Values{"keys": {"restart-back"}}, &onlineBack
				switch i % 12 {
				case 5:
					route, q, list = "/im/push/mids", url.Values{"mids": {"3"}}, &onlineMid
				case 11:
					q, list = url.Values{"keys": {"restart-never"}}, &onlineGone
				}
				body := fmt.Sprintf("%s-%d", q.Encode(), i)
				if push(route, q, body) {
					mu.Lock()
					*list = append(*list, body)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if len(onlineBack) != backlog || len(onlineMid) != byMid || len(onlineGone) != stray {
		t.Fatalf("answered online: %d of %d, %d of %d and %d of %d pushes, want all",
			len(onlineBack), backlog, len(onlineMid), byMid, len(onlineGone), stray)
	}

	// The node dies with its clients' connections; it restarts under the
	// same id and addresses, and job starts while its clients are away.
	cloud.kill()
	_, _, _ = back.Close(), never.Close(), keyless.Close()
	startProc(t, bin, cloudArgs...)
	pushQueue := topicOf(t, topics, "push")
	queued := queueReady(t, pushQueue)
	startProc(t, bin, args("--stages", "job")...)
	waitFor(t, "job to take messages it cannot deliver yet", func() bool { return queueReady(t, pushQueue) < queued })

	back = dial(1, "restart-back")
	keyless = dial(3, "")
	dups := repeats(collect(t, "the reconnected client", back, onlineBack))
	dups += repeats(collect(t, "user 3's new connection", keyless, onlineMid))

	// The pushes to the client that never came back are in the poison
	// queue with the reason, each once, carrying its key.
	pq := poisonQueue(t, topics)
	poisoned := map[string]string{} // body -> reason
	allPoisoned := func() bool {
		list, _, err := pq.List(context.Background(), "", 1000)
		if err != nil {
			t.Fatal(err)
		}
		clear(poisoned)
		for _, p := range list {
			pm, err := pipeline.DecodePush(message.NewMessage(p.UUID, p.Payload))
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(pm.Keys, []string{"restart-never"}) {
				t.Fatalf("poisoned push for keys %v: only restart-never stayed offline", pm.Keys)
			}
			poisoned[string(pm.Msg)] = p.Metadata.Get(middleware.ReasonForPoisonedKey)
		}
		return len(poisoned) >= stray
	}
	deadline := time.Now().Add(grace + 2*wait)
	for !allPoisoned() {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d pushes to the absent client poisoned", len(poisoned), stray)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, body := range onlineGone {
		reason, ok := poisoned[body]
		if !ok {
			t.Fatalf("push %q answered online is neither delivered nor poisoned", body)
		}
		if !strings.HasPrefix(reason, pipeline.ReasonRecipientsOffline) {
			t.Fatalf("push %q poisoned with reason %q, want %q", body, reason, pipeline.ReasonRecipientsOffline)
		}
	}
	t.Logf("%d pushes by key and %d by user id delivered after the restart (%d twice), %d undelivered in the poison queue as %q",
		len(onlineBack), len(onlineMid), dups, len(onlineGone), pipeline.ReasonRecipientsOffline)
}
