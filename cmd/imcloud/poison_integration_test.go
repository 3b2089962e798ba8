//go:build integration

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/nats-io/nats.go"
	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters"
	"imcloud/adapters/amqp/amqptest"
	"imcloud/adapters/redis"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
)

// TestIntegrationPoisonCommand drives `imcloud poison` against RabbitMQ on
// an empty poison queue of the test's own.
func TestIntegrationPoisonCommand(t *testing.T) {
	topic := fmt.Sprintf("imcloud.test.cli.%d", time.Now().UnixNano())
	sets := []string{"--set", "topics.poison=" + topic + ".poison", "--set", "topics.push=" + topic + ".push"}
	// The push queue, and its 4 shards of the replay below.
	amqptest.DeleteAtEnd(t, config.Default().Broker.AMQP.URL, topic+".poison", topic+".push",
		topic+".push.0", topic+".push.1", topic+".push.2", topic+".push.3")
	out, _, err := runCmd(t, nil, append([]string{"poison", "list"}, sets...)...)
	if err != nil || !strings.Contains(out, "0 poisoned message(s)") {
		t.Fatalf("list: %q %v", out, err)
	}
	out, _, err = runCmd(t, nil, append([]string{"poison", "replay", "--all"}, sets...)...)
	if err != nil || !strings.Contains(out, "replayed 0") {
		t.Fatalf("replay: %q %v", out, err)
	}

	// With a Redis registry, a replay from a configuration whose shards
	// differ from the running cluster's is refused before it moves
	// anything: its messages would go to queues no job reads.
	prefix := fmt.Sprintf("imcloud-test-cli-%d:", time.Now().UnixNano())
	rdb, err := redis.Connect(context.Background(), config.Default().Registry.Redis)
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	running := redis.NewAgreements(rdb, prefix)
	if o, err := running.Agree(context.Background(), pipeline.PushShardsSetting, "4", "job-1", time.Minute); err != nil || o != (pipeline.Agreed{}) {
		t.Fatalf("record the running cluster: %+v %v", o, err)
	}
	t.Cleanup(func() { _ = running.Leave(context.Background(), pipeline.PushShardsSetting, "job-1") })
	withRedis := append(sets, "--set", "registry.kind=redis", "--set", "registry.redis.prefix="+prefix)
	_, _, err = runCmd(t, nil, append([]string{"poison", "replay", "--all"}, withRedis...)...)
	if err == nil || !strings.Contains(err.Error(), "runs with 4") {
		t.Fatalf("replay with 1 shard beside a cluster of 4: %v, want refused", err)
	}
	shardSets := append(withRedis, "--set", "topics.push_shards=4")
	if out, _, err := runCmd(t, nil, append([]string{"poison", "replay", "--all"}, shardSets...)...); err != nil || !strings.Contains(out, "replayed 0") {
		t.Fatalf("replay agreeing with the cluster: %q %v", out, err)
	}
}

// TestIntegrationPoisonCommandStreams drives `imcloud poison` against NATS
// JetStream and Redis Streams: a message written to the poison topic as
// the poison middleware writes it is listed, replayed to the push shard it
// was poisoned from (and read back from it) and, another, purged; by
// --key when its id is also a decoy's, which --id refuses.
func TestIntegrationPoisonCommandStreams(t *testing.T) {
	for _, kind := range []string{config.BrokerNATS, config.BrokerRedisStream} {
		for _, shards := range []int{1, 2} {
			t.Run(fmt.Sprintf("%s/push_shards=%d", kind, shards), func(t *testing.T) { testPoisonCommandStreams(t, kind, shards) })
		}
	}
}

func testPoisonCommandStreams(t *testing.T, kind string, shards int) {
	cfg := config.Default()
	cfg.Broker.Kind = kind
	topic := fmt.Sprintf("imcloud.test.cli.%s.%d", kind, time.Now().UnixNano())
	cfg.Topics.Poison, cfg.Topics.Push, cfg.Topics.PushShards = topic+".poison", topic+".push", shards
	// The last shard: with more than one, not where a message
	// with no record of its shard would go.
	shard := cfg.Topics.PushTopics()[shards-1]
	t.Cleanup(func() { dropTopics(t, cfg) })
	sets := []string{"--set", "broker.kind=" + kind, "--set", "topics.poison=" + cfg.Topics.Poison, "--set", "topics.push=" + cfg.Topics.Push,
		"--set", fmt.Sprintf("topics.push_shards=%d", shards)}
	poison := func(args ...string) string {
		t.Helper()
		out, errOut, err := runCmd(t, nil, append(append([]string{"poison"}, args...), sets...)...)
		if err != nil {
			t.Fatalf("poison %v: %v\n%s%s", args, err, out, errOut)
		}
		return out
	}

	b, err := adapters.OpenBroker(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for _, id := range []string{"cli-replay", "cli-purge", "cli-purge"} {
		msg := message.NewMessage(watermill.NewUUID(), []byte("payload of "+id))
		msg.Metadata.Set(pipeline.MetaMessageID, id)
		msg.Metadata.Set(middleware.ReasonForPoisonedKey, "boom "+id)
		msg.Metadata.Set(middleware.PoisonedHandlerKey, "job")
		msg.Metadata.Set(middleware.PoisonedTopicKey, shard)
		if err := b.Publisher.Publish(cfg.Topics.Poison, msg); err != nil {
			t.Fatal(err)
		}
	}

	out := poison("list")
	if !strings.Contains(out, "3 poisoned message(s)") || !strings.Contains(out, "cli-replay") || !strings.Contains(out, "boom cli-purge") {
		t.Fatalf("list:\n%s", out)
	}
	var purgeKeys []string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == "cli-purge" {
			purgeKeys = append(purgeKeys, f[0])
		}
	}
	if len(purgeKeys) != 2 || purgeKeys[0] == purgeKeys[1] {
		t.Fatalf("keys of cli-purge %v, want two distinct in:\n%s", purgeKeys, out)
	}
	if out := poison("list", "--limit", "2"); !strings.Contains(out, "2 poisoned message(s)") || !strings.Contains(out, "more remain: list on with --after "+purgeKeys[0]) {
		t.Fatalf("list --limit 2:\n%s", out)
	}
	if out := poison("list", "--after", purgeKeys[0]); !strings.Contains(out, "1 poisoned message(s)") || !strings.Contains(out, purgeKeys[1]) || strings.Contains(out, "more remain") {
		t.Fatalf("list --after %s:\n%s", purgeKeys[0], out)
	}
	_, _, err = runCmd(t, nil, append([]string{"poison", "purge", "--id", "cli-purge"}, sets...)...)
	if !errors.Is(err, pipeline.ErrAmbiguousID) || !strings.Contains(err.Error(), purgeKeys[0]) || !strings.Contains(err.Error(), purgeKeys[1]) {
		t.Fatalf("purge --id naming two: %v; want ErrAmbiguousID naming both keys", err)
	}
	if out := poison("purge", "--key", purgeKeys[1]); !strings.Contains(out, "purged 1 message(s)") {
		t.Fatalf("purge --key:\n%s", out)
	}
	if out := poison("replay", "--id", "cli-replay"); !strings.Contains(out, "replayed 1 message(s) to "+shard+"\n") {
		t.Fatalf("replay:\n%s", out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	msgs, err := b.Subscriber.Subscribe(ctx, shard)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-msgs:
		m.Ack()
		if m.Metadata.Get(pipeline.MetaMessageID) != "cli-replay" || string(m.Payload) != "payload of cli-replay" || m.Metadata.Get(middleware.ReasonForPoisonedKey) != "" {
			t.Fatalf("push shard %s got %v %q", shard, m.Metadata, m.Payload)
		}
	case <-ctx.Done():
		t.Fatalf("replayed message not read back from the push shard %s", shard)
	}
	if out := poison("purge", "--id", "cli-purge"); !strings.Contains(out, "purged 1 message(s)") {
		t.Fatalf("purge:\n%s", out)
	}
	if out := poison("list"); !strings.Contains(out, "0 poisoned message(s)") {
		t.Fatalf("list after replay and purge:\n%s", out)
	}
}

// dropTopics deletes the streams of cfg's poison topic and push shards.
func dropTopics(t *testing.T, cfg config.Config) {
	switch cfg.Broker.Kind {
	case config.BrokerNATS:
		conn, err := nats.Connect(cfg.Broker.NATS.URL)
		if err != nil {
			t.Logf("cleanup: %v", err)
			return
		}
		defer conn.Close()
		js, err := conn.JetStream()
		if err != nil {
			return
		}
		for _, topic := range append(cfg.Topics.PushTopics(), cfg.Topics.Poison) {
			_ = js.DeleteStream(strings.ReplaceAll(topic, ".", "_"))
		}
	case config.BrokerRedisStream:
		rdb := goredis.NewClient(&goredis.Options{Addr: cfg.Broker.RedisStream.Addr})
		defer rdb.Close()
		rdb.Del(context.Background(), append(cfg.Topics.PushTopics(), cfg.Topics.Poison)...)
	}
}
