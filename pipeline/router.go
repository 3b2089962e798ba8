package pipeline

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
)

// RouterConfig is how job's router delivers: the job.* keys, which the
// composition root maps here, so that the framework needs no
// configuration loader.
type RouterConfig struct {
	// Throttle caps messages per second (job.throttle); 0 is no cap.
	Throttle int
	// Timeout bounds each attempt (job.timeout).
	Timeout time.Duration
	// MaxRetries, InitialInterval, MaxInterval and Multiplier are the
	// retry backoff (job.retry.*).
	MaxRetries                   int
	InitialInterval, MaxInterval time.Duration
	Multiplier                   float64
	// DedupeTTL is how long a delivered id is remembered (job.dedupe.ttl);
	// 0 turns deduplication off.
	DedupeTTL time.Duration
	// ConfigHold is how long one delivery of a message the cloud nodes
	// refuse for this node's configuration is held before it goes back to
	// the broker (config.ConfigFaultHold, which job's worst case counts).
	ConfigHold time.Duration
	// Observe, if set, is told each message's outcome in the router:
	// "retried" per retry, "duplicate" for one dedupe dropped, "offline"
	// or "poisoned" for one sent to the poison topic (metrics.Job.Result;
	// the handler counts "delivered" itself).
	Observe func(result string)
}

// NewRouter returns a router whose handlers run inside the delivery
// middleware stack built from cfg. The order is what makes delivery
// correct; Watermill wraps the first middleware added outermost:
//
//	unbundle       runs each message of a bundle (Bundler) down the rest of
//	               the stack on its own, all at once; acks the bundle when
//	               all are settled
//	growStack      grows the goroutine Watermill starts per message in one step
//	CorrelationID  copies the correlation id onto anything a handler emits
//	Throttle       caps messages per second (job.throttle; 0 = off)
//	PoisonQueue    a message that failed every retry goes to the poison topic
//	               with its reason, then is acked: never dropped, never looping
//	keepContext    the poison publish gets the message's own context, not the
//	               cancelled one Timeout leaves behind
//	dedupe         skips an id already delivered; marks an id only after
//	               success, so a retried failure (or a push that reached
//	               only some of its recipients) is not taken for a duplicate
//	hold           recipients who were online at accept but are not connected
//	               at delivery (a cloud node restarted, its clients not back
//	               yet) are retried until job.offline_grace ends, then the
//	               message goes to poison with "recipients offline"
//	               (holdConfigFault, outside it: a call the cloud nodes refuse
//	               for this node's configuration, a wrong cluster.secret, is
//	               held and then handed back to the broker: never retried,
//	               never poisoned; PoisonQueue lets that error through)
//	Retry          retries with exponential backoff, up to job.retry.max_retries
//	Timeout        bounds each attempt by job.timeout (a fresh context per retry)
//	Recoverer      turns a handler panic into an error the layers above see
//
// Throttle, the holds and Retry keep a message unacked; config.JobWorstCase
// sums how long, and configuration validation keeps it below the broker's
// redelivery window and cloud.dedupe_ttl. A change to this stack that
// holds a message longer must change that sum too.
//
// store may be nil when cfg.DedupeTTL is 0.
func NewRouter(cfg RouterConfig, poisonTopic string, poisonPub message.Publisher, store DedupeStore, logger *slog.Logger) (*message.Router, error) {
	return newRouter(cfg, poisonTopic, poisonPub, store, logger, holdTiming{first: configHoldFirst, max: configHoldMax, total: cfg.ConfigHold})
}

func newRouter(cfg RouterConfig, poisonTopic string, poisonPub message.Publisher, store DedupeStore, logger *slog.Logger, hold holdTiming) (*message.Router, error) {
	wlog := WatermillLogger(logger)
	r, err := message.NewRouter(message.RouterConfig{}, wlog)
	if err != nil {
		return nil, fmt.Errorf("create router: %w", err)
	}
	observe := cfg.Observe
	if observe == nil {
		observe = func(string) {}
	}
	poison, err := middleware.PoisonQueueWithFilter(timedPublisher{poisonPub, observe}, poisonTopic, notPoison)
	if err != nil {
		return nil, fmt.Errorf("create poison queue middleware: %w", err)
	}
	r.AddMiddleware(unbundle, growStack, middleware.CorrelationID)
	if cfg.Throttle > 0 {
		r.AddMiddleware(middleware.NewThrottle(int64(cfg.Throttle), time.Second).Middleware)
	}
	r.AddMiddleware(poison, keepContext)
	if cfg.DedupeTTL > 0 {
		if store == nil {
			return nil, fmt.Errorf("job.dedupe.enabled: no dedupe store given")
		}
		r.AddMiddleware(dedupe(store, cfg.DedupeTTL, logger, observe))
	}
	r.AddMiddleware(
		holdConfigFault(logger, hold),
		holdUndelivered(logger),
		middleware.Retry{
			MaxRetries:          cfg.MaxRetries,
			InitialInterval:     cfg.InitialInterval,
			MaxInterval:         cfg.MaxInterval,
			Multiplier:          cfg.Multiplier,
			ResetContextOnRetry: true,
			ShouldRetry:         func(p middleware.RetryParams) bool { return retryable(p.Err) },
			OnRetryHook:         func(int, time.Duration) { observe("retried") },
			Logger:              wlog,
		}.Middleware,
		middleware.Timeout(cfg.Timeout),
		middleware.Recoverer,
	)
	return r, nil
}

// SettleTimeout bounds each step job takes around a message's attempts:
// a dedupe store call and the poison publish after the last retry. A
// broker or store that stops answering would otherwise hold the message
// unacked without end; with it, job's worst case on one message
// (config.JobWorstCase, which counts config.SettleSteps of them) holds.
// It equals config.SettleTimeout (a test checks).
const SettleTimeout = 5 * time.Second

// timedPublisher publishes each message with its context bounded by
// SettleTimeout, and tells observe what it poisoned.
type timedPublisher struct {
	message.Publisher
	observe func(result string)
}

func (p timedPublisher) Publish(topic string, msgs ...*message.Message) error {
	for _, m := range msgs {
		ctx, cancel := context.WithTimeout(m.Context(), SettleTimeout)
		orig := m.Context()
		m.SetContext(ctx)
		err := p.Publisher.Publish(topic, m)
		m.SetContext(orig)
		cancel()
		if err != nil {
			return err
		}
		if strings.Contains(m.Metadata.Get(middleware.ReasonForPoisonedKey), ReasonRecipientsOffline) {
			p.observe("offline")
		} else {
			p.observe("poisoned")
		}
	}
	return nil
}
