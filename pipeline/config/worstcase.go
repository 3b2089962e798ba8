package config

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"time"
)

// ConfigFaultHold is how long job holds one delivery of a message that the
// cloud nodes refuse for this node's own configuration (a wrong
// cluster.secret) before handing it back to the broker
// (pipeline.holdConfigFault). It counts in JobWorstCase.
const ConfigFaultHold = 20 * time.Second

// SettleTimeout bounds each step job takes around a message's attempts,
// and SettleSteps is how many one message may take: a dedupe store call
// before a bundled message's first try (pipeline's firstTry), another
// before the stack's first attempt when that try failed, and after the
// last attempt the store's mark or the poison publish
// (pipeline.SettleTimeout, which a test keeps equal). 5 s is
// thousands of times a healthy Redis or broker's answer on loopback.
const (
	SettleTimeout = 5 * time.Second
	SettleSteps   = 3
)

// NATSMaxAckPending is JetStream's default MaxAckPending, which the job
// consumer keeps: at most this many messages of the push stream are
// unacked at once, across every job sharing the consumer.
const NATSMaxAckPending = 1000

// WorstCase is job's longest time between receiving one message from the
// broker and settling it (ack, nack or poison), term by term as the
// middleware of pipeline.NewRouter runs them (outermost first):
//
//   - Throttle: waiting for the throttle's ticker behind every other
//     message this job may hold unacked (job.throttle), counted where a
//     broker's redelivery window sees it (nats, redisstream);
//   - ConfigHold: a message the cloud nodes refuse for this node's
//     configuration is re-run for up to ConfigFaultHold, and the run that
//     starts before it ends may take all that follows;
//   - OfflineGrace: recipients offline are re-tried until their grace ends
//     (job.offline_grace from the first time they were found offline, never
//     later than this message's first attempt), and again the last run may
//     take all that follows;
//   - Attempts × Timeout + Backoff: the Retry middleware's runs, each bounded
//     by job.timeout, with its sleeps between them (RetryBackoff);
//   - Settle: the dedupe store's calls and the poison publish, each bounded
//     by SettleTimeout.
type WorstCase struct {
	Throttle     time.Duration
	ConfigHold   time.Duration
	OfflineGrace time.Duration
	Attempts     int
	Timeout      time.Duration
	Backoff      time.Duration
	Settle       time.Duration
}

// Total is how long the message may stay unacked: every term, saturating
// rather than overflowing. The broker's redelivery window must exceed it.
func (w WorstCase) Total() time.Duration { return addDur(w.Throttle, w.Handling()) }

// Handling is the time from the first attempt to settling: Total without
// the throttle's wait, before which no cloud node has seen the message.
// cloud.dedupe_ttl must exceed it.
func (w WorstCase) Handling() time.Duration {
	return addDur(w.ConfigHold, w.OfflineGrace, mulDur(w.Timeout, w.Attempts), w.Backoff, w.Settle)
}

// String spells the sum with the key behind each term, e.g.
// "job.timeout 30s × 6 attempts + backoff 14.2s via job.retry.* + job.offline_grace 30s + ...".
func (w WorstCase) String() string { return w.terms(true) }

func (w WorstCase) terms(throttle bool) string {
	terms := []string{fmt.Sprintf("job.timeout %s × %d attempts", w.Timeout, w.Attempts)}
	if w.Backoff > 0 {
		terms = append(terms, fmt.Sprintf("backoff %s via job.retry.*", w.Backoff))
	}
	if w.OfflineGrace > 0 {
		terms = append(terms, fmt.Sprintf("job.offline_grace %s", w.OfflineGrace))
	}
	if w.ConfigHold > 0 {
		terms = append(terms, fmt.Sprintf("%s holding a message refused for cluster.secret", w.ConfigHold))
	}
	if w.Settle > 0 {
		terms = append(terms, fmt.Sprintf("%s for the dedupe store and the poison publish", w.Settle))
	}
	if throttle && w.Throttle > 0 {
		terms = append(terms, fmt.Sprintf("%s waiting for job.throttle", w.Throttle))
	}
	return strings.Join(terms, " + ")
}

// JobWorstCase is job's worst-case time on one message with this
// configuration; see WorstCase.
func (c Config) JobWorstCase() WorstCase {
	j := c.Job
	w := WorstCase{
		ConfigHold:   ConfigFaultHold,
		Settle:       SettleTimeout * SettleSteps,
		OfflineGrace: max(j.OfflineGrace, 0),
		Attempts:     max(j.Retry.MaxRetries, 0) + 1,
		Timeout:      j.Timeout,
		Backoff:      j.RetryBackoff(),
	}
	if j.Throttle > 0 {
		// Watermill's throttle lets one message through per tick of
		// 1s/throttle; the last of those held waits for all the others.
		w.Throttle = mulDur(time.Second/time.Duration(j.Throttle), c.heldUnacked())
	}
	return w
}

// MaxBundle is how many pushes one broker message may carry
// (pipeline.MaxBundle, which a test keeps equal): logic bundles the pushes
// it publishes together, and job's router runs each on its own, the
// throttle included.
const MaxBundle = 256

// heldUnacked is how many pushes one job may hold unacked at once where a
// redelivery window counts their time: the router starts a handler for
// each message as it arrives, and each push of a bundle at once. On NATS
// the subscriptions hand over every message they pull, so the consumer's
// MaxAckPending bounds them; Redis Streams hands each subscription one
// message at a time; RabbitMQ hands each of job.concurrency consumers up
// to broker.amqp.prefetch deliveries. Each message may be a bundle of
// MaxBundle pushes. The embedded broker has no window (0).
func (c Config) heldUnacked() int {
	switch c.Broker.Kind {
	case BrokerAMQP:
		return max(c.Broker.AMQP.Prefetch, 1) * max(c.Job.Concurrency, 1) * MaxBundle
	case BrokerNATS:
		return NATSMaxAckPending * MaxBundle
	case BrokerRedisStream:
		return max(c.Job.Concurrency, 1) * MaxBundle
	default:
		return 0
	}
}

// RedeliverWindow is the active broker's redelivery window and its key:
// how long a message may stay unacked before the broker (or, on RabbitMQ,
// our subscriber) hands it to another job. ok is false for the embedded
// broker, which never does.
func (b Broker) RedeliverWindow() (key string, d time.Duration, ok bool) {
	switch b.Kind {
	case BrokerAMQP:
		return "broker.amqp.redeliver_after", b.AMQP.RedeliverAfter, true
	case BrokerNATS:
		return "broker.nats.redeliver_after", b.NATS.RedeliverAfter, true
	case BrokerRedisStream:
		return "broker.redisstream.redeliver_after", b.RedisStream.RedeliverAfter, true
	default:
		return "", 0, false
	}
}

// RetryBackoff is the total the Retry middleware sleeps between the
// job.retry.max_retries + 1 attempts of one message, as Watermill's
// middleware.Retry (v1.5) computes it: it draws NextBackOff twice per
// failed attempt, once for its ShouldRetry hook and once for the sleep, so
// the sleeps are initial × multiplier^1, ^3, ^5 ... each capped at
// max_interval, not ^0, ^1, ^2. With the defaults (100ms, ×2, cap 5s,
// 5 retries) that is 0.2 + 0.8 + 3.2 + 5 + 5 = 14.2s, not 3.1s;
// pipeline's TestRetryBackoffMatchesConfig measures it.
func (j Job) RetryBackoff() time.Duration {
	r := j.Retry
	if r.MaxRetries <= 0 || r.InitialInterval <= 0 {
		return 0
	}
	// cenkalti/backoff/v5's ExponentialBackOff without randomisation.
	cur := r.InitialInterval
	next := func() time.Duration {
		d := cur
		if float64(cur) >= float64(r.MaxInterval)/r.Multiplier {
			cur = r.MaxInterval
		} else {
			cur = time.Duration(float64(cur) * r.Multiplier)
		}
		return d
	}
	var total time.Duration
	for i := range r.MaxRetries {
		next() // ShouldRetry's draw
		d := next()
		total = addDur(total, d)
		if cur == d {
			// Every further sleep is d (max_interval, or a multiplier
			// of 1): no need to loop through a large max_retries.
			return addDur(total, mulDur(d, r.MaxRetries-i-1))
		}
	}
	return total
}

// CheckWorstCase refuses a job whose worst case on one message
// (JobWorstCase) is not below the windows that assume it is over: the
// broker's redelivery window (a second job would take the message while
// the first still holds it) and cloud.dedupe_ttl (a cloud node would
// forget it delivered the message while job may still retry it, and
// deliver it twice; the throttle's wait does not count, for no cloud node
// has seen the message before it). job.dedupe.ttl must outlast both the worst case and
// the broker's window, for it catches a copy the broker hands out again
// after this job delivered the message (its ack lost).
//
// It applies when this process runs job, with the values its own
// configuration states: cloud nodes configured separately must use the
// same cloud.dedupe_ttl.
func (c Config) CheckWorstCase() error {
	if !c.Has(StageJob) || !c.worstCaseSound() {
		return nil
	}
	w := c.JobWorstCase()
	total := w.Total()
	lower := "lower job.timeout, job.retry.max_retries, job.retry.max_interval or job.offline_grace"
	var errs []error
	if key, window, ok := c.Broker.RedeliverWindow(); ok && total >= window {
		lowerAll := lower
		if w.Throttle > 0 {
			lowerAll += ", raise job.throttle"
		}
		errs = append(errs, fmt.Errorf("job: worst case %s on one message (%s) is not below %s %s: the broker would hand the message to another job while this one still holds it, and it would be delivered twice; %s, or raise %s above %s",
			total, w, key, window, lowerAll, key, total))
	}
	if handling := w.Handling(); handling >= c.Cloud.DedupeTTL {
		errs = append(errs, fmt.Errorf("job: worst case %s on one message (%s) is not below cloud.dedupe_ttl %s: a cloud node would forget delivering the message while job may still retry it, and deliver it twice; %s, or raise cloud.dedupe_ttl above %s on every cloud node",
			handling, w.terms(false), c.Cloud.DedupeTTL, lower, handling))
	}
	if c.Job.Dedupe.Enabled {
		need, what := w.Handling(), "job's worst case on one message"
		if key, window, ok := c.Broker.RedeliverWindow(); ok && window > need {
			need, what = window, key
		}
		if c.Job.Dedupe.TTL <= need {
			errs = append(errs, fmt.Errorf("job.dedupe.ttl: %s is not above %s (%s): job would forget delivering a message before the broker can hand out a copy of it again; raise job.dedupe.ttl",
				c.Job.Dedupe.TTL, what, need))
		}
	}
	return errors.Join(errs...)
}

// worstCaseSound reports whether the values CheckWorstCase sums and
// compares are each valid; Validate reports those that are not, and a sum
// of a negative timeout or a multiplier below 1 would mean nothing.
func (c Config) worstCaseSound() bool {
	j, r := c.Job, c.Job.Retry
	return j.Timeout > 0 && j.Throttle >= 0 && j.OfflineGrace >= 0 && j.Concurrency > 0 &&
		r.MaxRetries >= 0 && r.InitialInterval > 0 && r.MaxInterval > 0 && r.Multiplier >= 1 &&
		j.Dedupe.TTL > 0 && c.Cloud.DedupeTTL > 0 &&
		c.Broker.AMQP.RedeliverAfter > 0 && c.Broker.NATS.RedeliverAfter > 0 && c.Broker.RedisStream.RedeliverAfter > 0
}

// addDur adds durations, saturating at the largest one.
func addDur(ds ...time.Duration) time.Duration {
	var s time.Duration
	for _, d := range ds {
		if s > math.MaxInt64-d {
			return math.MaxInt64
		}
		s += d
	}
	return s
}

// mulDur multiplies, saturating at the largest duration.
func mulDur(d time.Duration, n int) time.Duration {
	if n <= 0 || d <= 0 {
		return 0
	}
	if d > math.MaxInt64/time.Duration(n) {
		return math.MaxInt64
	}
	return d * time.Duration(n)
}
