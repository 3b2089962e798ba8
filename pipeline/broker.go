package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/adapters/amqp"
	"imcloud/adapters/gochannel"
	"imcloud/adapters/nats"
	"imcloud/adapters/redisstream"
	"imcloud/pipeline/config"
)

// Broker is the publisher and subscriber of one broker connection.
type Broker struct {
	Publisher  message.Publisher
	Subscriber message.Subscriber
	// SharedQueue is true when several subscriptions to one topic share its
	// messages (a work queue) rather than each receiving all of them.
	SharedQueue bool
	closers     []func() error
	refused     *atomic.Int64 // messages refused for a full queue
}

// NewBroker connects to the broker cfg.Kind names. Queues of the push
// and upstream topics are declared before anything is published, so no
// message is dropped for want of a consumer. Every queue or stream it
// creates holds at most its topics.*_max_length messages; a publish to a
// full one fails with ErrQueueFull; the embedded gochannel broker bounds
// the messages it holds in memory (broker.gochannel.max_pending).
func NewBroker(cfg config.Broker, topics config.Topics, logger *slog.Logger) (*Broker, error) {
	b, err := newBroker(cfg, topics, logger)
	if err != nil {
		return nil, err
	}
	b.bound(logger)
	return b, nil
}

func newBroker(cfg config.Broker, topics config.Topics, logger *slog.Logger) (*Broker, error) {
	wlog := WatermillLogger(logger)
	limits := maxLengths(topics)
	switch cfg.Kind {
	case config.BrokerGoChannel:
		// Only this process can subscribe to the embedded broker: in
		// standalone nothing reads topics.upstream (and topics.poison),
		// and what clients send with op 4 is answered op 5 and dropped.
		// It is said once a minute, with the count left out between.
		unheard := NewRateLog(logger, slog.LevelWarn, time.Minute)
		gc := gochannel.New(wlog, cfg.GoChannel.MaxPending, func(topic string, msgs int) {
			unheard.Log("embedded broker dropped messages: nothing in this process subscribes to their topic (broker.kind gochannel); use a shared broker to read it from another process",
				"topic", topic, "messages", msgs)
		})
		return &Broker{Publisher: gc, Subscriber: gc, closers: []func() error{gc.Close}}, nil
	case config.BrokerAMQP:
		pub, err := amqp.NewBoundedPublisher(cfg.AMQP.URL, wlog, cfg.AMQP.Channels, limits, topics.Push, topics.Poison, topics.Upstream)
		if err != nil {
			return nil, err
		}
		// Only job reads the push topic, through amqp.Subscriber, which
		// unpacks batches; poison and upstream stay one message each for
		// the poison tooling and business consumers.
		pub.Coalesce(func(topic string) bool { return topic == topics.Push })
		sub, err := amqp.NewBoundedSubscriber(cfg.AMQP.URL, wlog, cfg.AMQP.Prefetch, limits)
		if err != nil {
			_ = pub.Close()
			return nil, err
		}
		return &Broker{Publisher: pub, Subscriber: sub, SharedQueue: true, closers: []func() error{pub.Close, sub.Close}}, nil
	case config.BrokerNATS:
		pub, err := nats.NewPublisher(cfg.NATS.URL, limits)
		if err != nil {
			return nil, err
		}
		sub, err := nats.NewSubscriber(cfg.NATS.URL, redeliverAfter, cfg.AMQP.Prefetch, limits)
		if err != nil {
			_ = pub.Close()
			return nil, err
		}
		return &Broker{Publisher: pub, Subscriber: sub, SharedQueue: true, closers: []func() error{pub.Close, sub.Close}}, nil
	case config.BrokerRedisStream:
		// Publisher and subscriber each close the client they are given.
		pubClient, subClient := redisstream.NewClient(cfg.RedisStream.Addr), redisstream.NewClient(cfg.RedisStream.Addr)
		if err := pubClient.Ping(context.Background()).Err(); err != nil {
			_, _ = pubClient.Close(), subClient.Close()
			return nil, fmt.Errorf("redis %s: %w", cfg.RedisStream.Addr, err)
		}
		rpub, err := redisstream.NewPublisher(pubClient, wlog)
		if err != nil {
			return nil, err
		}
		pub := redisstream.NewBoundedPublisher(rpub, pubClient, limits, redisstream.TrimEvery, wlog)
		timing := redisstream.DefaultTiming()
		timing.MaxIdle = redeliverAfter
		sub, err := redisstream.NewSubscriber(subClient, consumerName(), timing, wlog)
		if err != nil {
			_ = pub.Close()
			return nil, err
		}
		return &Broker{Publisher: pub, Subscriber: sub, SharedQueue: true, closers: []func() error{pub.Close, sub.Close}}, nil
	default:
		return nil, fmt.Errorf("broker.kind %q: this build has no adapter for it yet", cfg.Kind)
	}
}

// redeliverAfter is how long a message may stay unacked before the broker
// hands it to another job, its handler presumed dead. It exceeds the time
// job's default retries take, so a message being retried is not doubled.
const redeliverAfter = 2 * time.Minute

// consumerName names this process among a consumer group's members.
func consumerName() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s-%d-%s", host, os.Getpid(), watermill.NewShortUUID())
}

// Close closes the publisher and subscriber.
func (b *Broker) Close() error {
	var errs []error
	for _, c := range b.closers {
		errs = append(errs, c())
	}
	return errors.Join(errs...)
}
