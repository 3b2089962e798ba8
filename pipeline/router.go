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

// NewRouter returns a router whose handlers (AddConsumer) run inside the
// delivery middleware stack built from cfg. The order is what makes delivery
// correct; Watermill wraps the first middleware added outermost:
//
//	unbundle       runs each message of a bundle (Bundler) down the rest of
//	               the stack on its own, all at once; acks the bundle when
//	               all are settled (its first try goes straight to the
//	               handler: firstTry; with a Starter and an in-process
//	               dedupe store, started in turn and then waited for:
//	               firstTry.tryAll)
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
func NewRouter(cfg RouterConfig, poisonTopic string, poisonPub message.Publisher, store DedupeStore, logger *slog.Logger) (*Router, error) {
	return newRouter(cfg, poisonTopic, poisonPub, store, logger, holdTiming{first: configHoldFirst, max: configHoldMax, total: cfg.ConfigHold})
}

// Router is job's Watermill router with the delivery middleware of
// NewRouter. Handlers are added with AddConsumer, which puts the stack
// around them; middleware added to the embedded router itself (the
// Prometheus metrics builder's) wraps each broker message, a bundle as
// one.
type Router struct {
	*message.Router
	// stack is the middleware, outermost first; retried is the same with
	// one retry fewer, for a bundled message whose first try failed.
	stack, retried []message.HandlerMiddleware
	first          *firstTry // nil: a bundle's messages go down the stack
}

func newRouter(cfg RouterConfig, poisonTopic string, poisonPub message.Publisher, store DedupeStore, logger *slog.Logger, hold holdTiming) (*Router, error) {
	wlog := WatermillLogger(logger)
	mr, err := message.NewRouter(message.RouterConfig{}, wlog)
	if err != nil {
		return nil, fmt.Errorf("create router: %w", err)
	}
	observe := cfg.Observe
	if observe == nil {
		observe = func(string) {}
	}
	// A message given up on is said once a second at most (with the
	// count of those left out): a cloud node down poisons thousands.
	poisoned := NewRateLog(logger, slog.LevelWarn, time.Second)
	poison, err := middleware.PoisonQueueWithFilter(timedPublisher{poisonPub, observe, poisoned}, poisonTopic, notPoison)
	if err != nil {
		return nil, fmt.Errorf("create poison queue middleware: %w", err)
	}
	if cfg.DedupeTTL > 0 && store == nil {
		return nil, fmt.Errorf("job.dedupe.enabled: no dedupe store given")
	}
	retry := func(maxRetries int) message.HandlerMiddleware {
		return middleware.Retry{
			MaxRetries:          maxRetries,
			InitialInterval:     cfg.InitialInterval,
			MaxInterval:         cfg.MaxInterval,
			Multiplier:          cfg.Multiplier,
			ResetContextOnRetry: true,
			ShouldRetry:         func(p middleware.RetryParams) bool { return retryable(p.Err) },
			OnRetryHook:         func(int, time.Duration) { observe("retried") },
			Logger:              wlog,
		}.Middleware
	}
	var throttle message.HandlerMiddleware
	if cfg.Throttle > 0 {
		throttle = middleware.NewThrottle(int64(cfg.Throttle), time.Second).Middleware
	}
	configFault, undelivered := holdConfigFault(logger, hold), holdUndelivered(logger)
	var dedupeMW message.HandlerMiddleware
	if cfg.DedupeTTL > 0 {
		dedupeMW = dedupe(store, cfg.DedupeTTL, logger, observe)
	}
	stack := func(retries int) []message.HandlerMiddleware {
		s := []message.HandlerMiddleware{growStack, middleware.CorrelationID}
		if throttle != nil {
			s = append(s, throttle)
		}
		s = append(s, poison, keepContext)
		if dedupeMW != nil {
			s = append(s, dedupeMW)
		}
		return append(s, configFault, undelivered, retry(retries), middleware.Timeout(cfg.Timeout), middleware.Recoverer)
	}
	r := &Router{Router: mr, stack: stack(cfg.MaxRetries)}
	// A bundled message's first try skips the stack (firstTry); when it
	// fails, the stack runs with one retry fewer, so that no message gets
	// more attempts, nor job's worst case more time, than before. Not with
	// a throttle, which must see every message, nor without retries,
	// where the try would be one attempt more.
	if throttle == nil && cfg.MaxRetries > 0 {
		r.retried = stack(cfg.MaxRetries - 1)
		r.first = &firstTry{timeout: cfg.Timeout, observe: observe, logger: logger}
		if cfg.DedupeTTL > 0 {
			r.first.store, r.first.ttl = store, cfg.DedupeTTL
		}
	}
	return r, nil
}

// AddConsumer adds a handler of topic's messages behind the delivery
// middleware; each message of a bundle goes through it on its own.
func (r *Router) AddConsumer(name, topic string, sub message.Subscriber, h message.NoPublishHandlerFunc) {
	r.AddStartingConsumer(name, topic, sub, h, nil)
}

// AddStartingConsumer is AddConsumer with start, which begins what h
// does without waiting (Starter): with an in-process dedupe store (or
// none), a bundle's first tries are started one after another on the
// bundle's goroutine and then waited for (firstTry.tryAll), rather than
// each run on a goroutine of its own. start may be nil.
func (r *Router) AddStartingConsumer(name, topic string, sub message.Subscriber, h message.NoPublishHandlerFunc, start Starter) {
	handler := func(msg *message.Message) ([]*message.Message, error) { return nil, h(msg) }
	compose := func(stack []message.HandlerMiddleware) message.HandlerFunc {
		chain := message.HandlerFunc(handler)
		for i := len(stack) - 1; i >= 0; i-- {
			chain = stack[i](chain)
		}
		return chain
	}
	chain := compose(r.stack)
	each := func(_ context.Context, msg *message.Message) ([]*message.Message, error) { return chain(msg) }
	var timeout time.Duration
	var all func(attempt context.Context, msgs []*message.Message) ([]*message.Message, error)
	if r.first != nil {
		retried := compose(r.retried)
		each = func(attempt context.Context, msg *message.Message) ([]*message.Message, error) {
			if r.first.try(msg, handler, attempt) {
				return nil, nil
			}
			return retried(msg)
		}
		timeout = r.first.timeout
		if start != nil && IsInProcess(r.first.store) {
			all = func(attempt context.Context, msgs []*message.Message) ([]*message.Message, error) {
				return r.first.tryAll(msgs, start, attempt, retried)
			}
		}
	}
	bundled := unbundle(chain, each, all, timeout)
	r.Router.AddConsumerHandler(name, topic, sub, func(msg *message.Message) error {
		_, err := bundled(msg)
		return err
	})
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
	logged  *RateLog
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
		reason := m.Metadata.Get(middleware.ReasonForPoisonedKey)
		if strings.Contains(reason, ReasonRecipientsOffline) {
			p.observe("offline")
		} else {
			p.observe("poisoned")
		}
		p.logged.Log("message given up on, moved to the poison topic (imcloud poison list)", "topic", topic,
			"message_id", m.Metadata.Get(MetaMessageID), "from", m.Metadata.Get(middleware.PoisonedTopicKey), "reason", reason)
	}
	return nil
}
