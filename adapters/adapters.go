// Package adapters opens the adapters a configuration names: the broker
// (broker.kind), the session registry and idempotency store
// (registry.kind) and job's deduplication store (job.dedupe.store). It is
// the one place that maps a kind to an adapter: adding a broker is a new
// package beside this one and a case here. The stages never import it;
// the composition root (cmd/imcloud/internal/process) and the CLI do.
package adapters

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/ThreeDotsLabs/watermill"

	"imcloud/adapters/amqp"
	"imcloud/adapters/gochannel"
	"imcloud/adapters/nats"
	"imcloud/adapters/redisstream"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
)

// OpenBroker connects to the broker cfg.Broker.Kind names. Queues of the
// push and upstream topics (and events, when on) are declared before anything is published, so
// no message is dropped for want of a consumer. Every queue or stream it
// creates holds at most its topics.*_max_length messages; a publish to a
// full one fails with pipeline.ErrQueueFull; the embedded gochannel
// broker bounds the messages it holds in memory
// (broker.gochannel.max_pending), and keeps its poison topic in a ring
// that evicts the oldest instead (broker.gochannel.max_poisoned).
func OpenBroker(cfg config.Config, logger *slog.Logger) (*pipeline.Broker, error) {
	bc, topics := cfg.Broker, cfg.Topics
	wlog := pipeline.WatermillLogger(logger)
	limits := topics.MaxLengths()
	switch bc.Kind {
	case config.BrokerGoChannel:
		// Only this process can subscribe to the embedded broker: in
		// standalone nothing reads topics.upstream, and what clients send
		// with op 4 is answered op 5 and dropped.
		// It is said once a minute, with the count left out between.
		unheard := pipeline.NewRateLog(logger, slog.LevelWarn, time.Minute)
		gc := gochannel.New(wlog, bc.GoChannel.MaxPending, func(topic string, msgs int) {
			unheard.Log("embedded broker dropped messages: nothing in this process subscribes to their topic (broker.kind gochannel); use a shared broker to read it from another process",
				"topic", topic, "messages", msgs)
		})
		// The poison topic is held, not dropped, so that the admin
		// listener (gochannel.PubSub.PoisonAdmin, /poison) can list and
		// replay it: a ring of broker.gochannel.max_poisoned messages at
		// most (and topics.poison_max_length), the oldest evicted when
		// full. It never refuses: a refused poison publish fails the
		// poison middleware's handler, and the message came back for ever,
		// holding a max_pending slot.
		evicted := pipeline.NewRateLog(logger, slog.LevelWarn, time.Minute)
		gc.Keep(topics.Poison, int(min(int64(bc.GoChannel.MaxPoisoned), positiveOr(topics.PoisonMaxLength, int64(bc.GoChannel.MaxPoisoned)))),
			func(topic string, msgs int, total int64) {
				evicted.Log("embedded broker evicted the oldest poisoned messages to keep newer ones (broker.gochannel.max_poisoned is full); list, replay or purge them on the admin listener's /poison",
					"topic", topic, "evicted", msgs, "evicted_total", total)
			})
		return pipeline.NewBroker(gc, gc, true, logger, gc.Close), nil
	case config.BrokerAMQP:
		declare := append(topics.PushTopics(), topics.Poison, topics.Upstream)
		if cfg.Events.Enabled {
			// Declared before the first event, like the others: an event
			// published to an undeclared queue would be dropped by the
			// exchange.
			declare = append(declare, topics.Events)
		}
		pub, err := amqp.NewBoundedPublisher(bc.AMQP.URL, wlog, bc.AMQP.Channels, limits, declare...)
		if err != nil {
			return nil, err
		}
		sub, err := amqp.NewBoundedSubscriber(bc.AMQP.URL, wlog, bc.AMQP.Prefetch, limits)
		if err != nil {
			_ = pub.Close()
			return nil, err
		}
		sub.SetAckTimeout(bc.AMQP.RedeliverAfter)
		return pipeline.NewBroker(pub, sub, true, logger, pub.Close, sub.Close), nil
	case config.BrokerNATS:
		pub, err := nats.NewPublisher(bc.NATS.URL, limits)
		if err != nil {
			return nil, err
		}
		sub, err := nats.NewSubscriber(bc.NATS.URL, bc.NATS.RedeliverAfter, bc.NATS.Prefetch, limits)
		if err != nil {
			_ = pub.Close()
			return nil, err
		}
		return pipeline.NewBroker(pub, sub, true, logger, pub.Close, sub.Close), nil
	case config.BrokerRedisStream:
		// Publisher and subscriber each close the client they are given.
		pubClient, subClient := redisstream.NewClient(bc.RedisStream.Addr), redisstream.NewClient(bc.RedisStream.Addr)
		if err := pubClient.Ping(context.Background()).Err(); err != nil {
			_, _ = pubClient.Close(), subClient.Close()
			return nil, fmt.Errorf("redis %s: %w", bc.RedisStream.Addr, err)
		}
		rpub, err := redisstream.NewPublisher(pubClient, wlog)
		if err != nil {
			return nil, err
		}
		pub := redisstream.NewBoundedPublisher(rpub, pubClient, limits, redisstream.TrimEvery, wlog)
		timing := redisstream.DefaultTiming()
		timing.MaxIdle = bc.RedisStream.RedeliverAfter
		sub, err := redisstream.NewSubscriber(subClient, consumerName(), timing, wlog)
		if err != nil {
			_ = pub.Close()
			return nil, err
		}
		return pipeline.NewBroker(pub, sub, true, logger, pub.Close, sub.Close), nil
	default:
		return nil, fmt.Errorf("broker.kind %q: this build has no adapter for it", bc.Kind)
	}
}

// OpenPoison opens the poison topic of the configured broker; replay
// re-publishes to the push shards (ReplayTargets). Every shared broker's admin works from
// any process (the CLI); the embedded broker's poison topic lives inside
// the process that runs it, whose admin is gochannel.PubSub.PoisonAdmin,
// served on that process's admin listener (LocalPoison).
func OpenPoison(cfg config.Config, logger *slog.Logger) (pipeline.PoisonAdmin, error) {
	bc, topics := cfg.Broker, cfg.Topics
	wlog := pipeline.WatermillLogger(logger)
	switch bc.Kind {
	case config.BrokerAMQP:
		return amqp.NewPoisonQueue(bc.AMQP.URL, topics.Poison, ReplayTargets(cfg), topics.MaxLengths(), wlog)
	case config.BrokerNATS:
		return nats.NewPoisonStream(bc.NATS.URL, topics.Poison, ReplayTargets(cfg), topics.MaxLengths())
	case config.BrokerRedisStream:
		return redisstream.NewPoisonStream(bc.RedisStream.Addr, topics.Poison, ReplayTargets(cfg), topics.MaxLengths(), wlog)
	case config.BrokerGoChannel:
		return nil, fmt.Errorf("broker.kind %q: the embedded broker's poison topic lives only in the memory of the process running it; reach it through that process's admin listener (imcloud poison --admin ADDR, with admin.addr set on the running standalone process)", bc.Kind)
	default:
		return nil, fmt.Errorf("broker.kind %q: poison tooling is not implemented for it", bc.Kind)
	}
}

// ReplayTargets are where a replay of cfg's poison topic may publish: all
// the push shards, not only those this process's job consumes
// (job.shards), since a message goes back to the shard it was poisoned
// from and other processes consume the rest.
func ReplayTargets(cfg config.Config) pipeline.ReplayTargets {
	return pipeline.ReplayTargets(cfg.Topics.PushTopics())
}

// LocalPoison is the admin of b's poison topic when it lives in this
// process (the embedded broker), replaying to the push shards; ok is
// false for a shared broker, whose poison topic OpenPoison reaches from
// anywhere.
func LocalPoison(cfg config.Config, b *pipeline.Broker) (admin pipeline.PoisonAdmin, ok bool, err error) {
	keeper, ok := b.Subscriber.(poisonKeeper)
	if !ok {
		return nil, false, nil
	}
	admin, err = keeper.PoisonAdmin(cfg.Topics.Poison, ReplayTargets(cfg))
	if err != nil {
		return nil, true, fmt.Errorf("open the embedded broker's poison admin: %w", err)
	}
	return admin, true, nil
}

// poisonKeeper is a broker whose poison topic lives in this process.
type poisonKeeper interface {
	PoisonAdmin(topic string, targets pipeline.ReplayTargets) (pipeline.PoisonAdmin, error)
}

// LocalPoison finds the embedded broker's admin by this interface: were
// the method's signature to drift from it, the assertion would fail
// quietly and the admin listener would say the broker is shared.
var _ poisonKeeper = (*gochannel.PubSub)(nil)

// positiveOr is n, or or when n is not positive (no limit).
func positiveOr(n, or int64) int64 {
	if n > 0 {
		return n
	}
	return or
}

// consumerName names this process among a consumer group's members.
func consumerName() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s-%d-%s", host, os.Getpid(), watermill.NewShortUUID())
}
