package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"imcloud/cmd/imcloud/internal/process"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/pb"
	"imcloud/stages/logic/token"
)

// TestStandalonePoisonOverAdmin: a standalone process (embedded broker)
// keeps what job poisons and serves it on its admin listener; imcloud
// poison --admin lists, replays and purges it there. A push to a key that
// is offline, with job.offline_grace 0s, is poisoned; once the key is
// connected, its replay reaches it. With push_shards 2 the push is
// poisoned from the last shard and replayed there: topics.push itself is
// no queue then, and the embedded broker would drop what went to it.
func TestStandalonePoisonOverAdmin(t *testing.T) {
	for _, shards := range []int{1, 2} {
		t.Run(fmt.Sprintf("push_shards=%d", shards), func(t *testing.T) { testStandalonePoisonOverAdmin(t, shards) })
	}
}

func testStandalonePoisonOverAdmin(t *testing.T, shards int) {
	const (
		secret = "poison-test-secret"
		key    = "k-poison"
		wait   = 10 * time.Second
	)
	cfg, err := config.Load(config.Sources{Sets: []string{
		"broker.kind=gochannel", "registry.kind=memory",
		"logic.http_addr=127.0.0.1:0", "logic.grpc_addr=127.0.0.1:0",
		"cloud.tcp_addr=127.0.0.1:0", "cloud.ws_addr=127.0.0.1:0", "cloud.grpc_addr=127.0.0.1:0",
		"admin.addr=127.0.0.1:0",
		"logic.auth.jwt_secret=" + secret, "logic.api_keys=poison-test-api-key-0123456789",
		"cluster.secret=poison-test-cluster-secret-0123456789",
		"job.offline_grace=0s", "job.retry.initial_interval=10ms", "job.retry.max_retries=1",
		fmt.Sprintf("topics.push_shards=%d", shards),
	}})
	if err != nil {
		t.Fatal(err)
	}
	shard := cfg.Topics.PushTopics()[shards-1]
	ctx := context.Background()
	n, err := process.Start(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(ctx, wait)
		defer cancel()
		_ = n.Shutdown(sctx)
	})
	admin := n.Addrs().Admin
	base := "http://" + admin
	cli := func(args ...string) string {
		t.Helper()
		out, errb, err := runCmd(t, nil, append([]string{"poison"}, append(args, "--admin", admin, "--set", "broker.kind=gochannel")...)...)
		if err != nil {
			t.Fatalf("imcloud poison %v: %v\nstderr: %s", args, err, errb)
		}
		return out
	}
	list := func() process.PoisonList {
		t.Helper()
		resp, err := http.Get(base + process.PoisonPath)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var l process.PoisonList
		if err := json.NewDecoder(resp.Body).Decode(&l); err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /poison: %s, %v", resp.Status, err)
		}
		return l
	}
	// poison pushes a message to the offline key past job and waits for
	// it in the poison topic.
	poison := func(id, body string) process.PoisonEntry {
		t.Helper()
		msg, err := pipeline.NewPushMessage(id, id, &pb.PushMsg{Type: pb.PushMsg_PUSH, Operation: 1000, Server: "gone", Keys: []string{key}, Msg: []byte(body)})
		if err != nil {
			t.Fatal(err)
		}
		if err := n.Broker().Publisher.Publish(shard, msg); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(wait)
		for {
			for _, e := range list().Messages {
				if e.ID == id {
					return e
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s was not poisoned within %s: %+v", id, wait, list())
			}
			time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
		}
	}

	first := poison("poison-test-1", "hello again")
	if first.Handler == "" || !strings.Contains(first.Reason, "offline") || first.PayloadBytes == 0 || first.Payload != nil || first.PoisonedAt.IsZero() {
		t.Fatalf("listed %+v: want handler, an offline reason, the payload's size without its bytes, a time", first)
	}
	t.Logf("listed %+v", first)
	if out := cli("list"); !strings.Contains(out, first.ID) || !strings.Contains(out, "1 poisoned message(s) in "+cfg.Topics.Poison) {
		t.Fatalf("poison list:\n%s", out)
	}

	// The key comes online; the replayed push reaches it.
	c, err := client.Dial(ctx, n.Addrs().CloudTCP, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tok, err := token.Sign(secret, token.Claims{Mid: 7, Key: key}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Auth([]byte(tok)); err != nil {
		t.Fatal(err)
	}
	if out := cli("replay", "--id", first.ID); !strings.Contains(out, "replayed 1 message(s) to "+shard+"\n") {
		t.Fatalf("poison replay: %s", out)
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	p, err := c.Read()
	if err != nil || p.Op != 1000 || string(p.Body) != "hello again" {
		t.Fatalf("after replay the client read op %d %q, %v; want op 1000 %q", p.Op, p.Body, err, "hello again")
	}
	if l := list(); len(l.Messages) != 0 {
		t.Fatalf("replayed and delivered, still listed: %+v", l)
	}

	// Purged over HTTP, and an unknown id through the CLI. The next push
	// must find the key offline: a push that raced the close could still
	// be handed to the closing connection.
	c.Close()
	waitOffline(t, n.Addrs().HTTP, "poison-test-api-key-0123456789", 7, wait)
	second := poison("poison-test-2", "gone for good")
	if out := cli("purge", "--id", "no-such-id"); !strings.Contains(out, "purged 0 message(s)") {
		t.Fatalf("purge of an unknown id: %s", out)
	}
	resp, err := http.PostForm(base+process.PoisonPurgePath, url.Values{"id": {second.ID}})
	if err != nil {
		t.Fatal(err)
	}
	var res process.PoisonResult
	err = json.NewDecoder(resp.Body).Decode(&res)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || res.Count != 1 || res.Action != "purge" {
		t.Fatalf("POST purge: %s %+v %v; want 200, 1 purged", resp.Status, res, err)
	}
	if out := cli("list"); !strings.Contains(out, "0 poisoned message(s)") {
		t.Fatalf("after purge: %s", out)
	}
}

// TestPoisonCLIOnEmbeddedBroker: without an admin address the CLI says
// where the embedded broker's poisoned messages are; --admin with a shared
// broker is refused; an admin listener that is not there is named.
func TestPoisonCLIOnEmbeddedBroker(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no admin address", []string{"poison", "list", "--set", "broker.kind=gochannel"}, "--admin"},
		{"--admin with a shared broker", []string{"poison", "list", "--admin", "127.0.0.1:1", "--set", "broker.kind=nats"}, "shared broker"},
		{"nothing listening", []string{"poison", "list", "--admin", "127.0.0.1:1", "--set", "broker.kind=gochannel"}, "reach the admin listener at 127.0.0.1:1"},
		{"admin.addr from the configuration", []string{"poison", "purge", "--all", "--set", "broker.kind=gochannel", "--set", "admin.addr=127.0.0.1:1"}, "127.0.0.1:1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := runCmd(t, nil, tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tt.want)
			}
		})
	}
}

// waitOffline waits until logic's registry has no session of mid.
func waitOffline(t *testing.T, logicHTTP, apiKey string, mid int64, wait time.Duration) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://%s/im/online/mids?mids=%d", logicHTTP, mid), nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+apiKey)
	deadline := time.Now().Add(wait)
	for {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var r struct {
			Data struct {
				Online  []int64 `json:"online"`
				Offline []int64 `json:"offline"`
			} `json:"data"`
		}
		err = json.NewDecoder(resp.Body).Decode(&r)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /im/online/mids: %s, %v", resp.Status, err)
		}
		if len(r.Data.Online) == 0 && slices.Contains(r.Data.Offline, mid) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("mid %d still online %s after its connection closed", mid, wait)
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
	}
}
