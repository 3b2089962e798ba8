package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
)

// MetaBundle marks a message that carries others (a pb.Batch of
// pb.Envelope): its value is how many. Only job's router reads the push
// topic, and it unbundles (see unbundle); poison, upstream and events
// messages are never bundled.
const MetaBundle = "bundle"

// Bundle limits. 256 messages: at that size a bundle's share of the
// broker's and the router's per-message work is under 1 % of a push's
// cost, and 256 room pushes held by one unbundled delivery stay a small
// fraction of a job's concurrency. 512 KiB: below NATS' default
// max_payload (1 MiB), the smallest broker limit; a message over it goes
// alone, as it always did.
const (
	MaxBundle      = 256
	MaxBundleBytes = 512 << 10
)

// bundleSenders is how many bundles of one topic may be out at once:
// RabbitMQ confirms them pipelined (a bundle waits one confirm round
// trip), so a few in flight keep its queue process busy while the next
// ones fill.
const bundleSenders = 4

// Bundler is a Publisher that gathers concurrent publishes into bundle
// messages, the way a database group-commits: a publish that finds no
// bundle being sent goes at once (alone: byte for byte the message it
// was); what arrives while bundles are out waits for the next, which
// takes all of it (up to the limits). There is no timer, so an idle
// system adds no latency, and a loaded one hands the broker and job's
// router one message per bundle instead of one per push: the per-message
// costs of both (a Watermill goroutine, the middleware, an ack, a queue
// entry) are paid once for up to MaxBundle pushes. A Publish returns when
// the bundle holding its messages was published, with that publish's
// error; the messages of one Publish call travel together where the
// limits allow, in order.
type Bundler struct {
	pub message.Publisher

	mu     sync.Mutex
	topics map[string]*bundleQueue
}

// NewBundler bundles what is published through pub.
func NewBundler(pub message.Publisher) *Bundler {
	return &Bundler{pub: pub, topics: map[string]*bundleQueue{}}
}

type bundleQueue struct {
	mu      sync.Mutex
	calls   []*bundleCall
	sending int
}

// bundleCall is one Publish call waiting for its bundle.
type bundleCall struct {
	msgs []*message.Message
	done chan error
}

// Publish publishes msgs to topic in the next bundle and waits for it,
// or until the first message's context ends: its messages may then still
// reach the broker with their bundle, as with any publish cut short.
func (b *Bundler) Publish(topic string, msgs ...*message.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	b.mu.Lock()
	q := b.topics[topic]
	if q == nil {
		q = &bundleQueue{}
		b.topics[topic] = q
	}
	b.mu.Unlock()
	c := &bundleCall{msgs: msgs, done: make(chan error, 1)}
	q.mu.Lock()
	q.calls = append(q.calls, c)
	start := q.sending < bundleSenders
	if start {
		q.sending++
	}
	q.mu.Unlock()
	if start {
		b.send(topic, q, c)
	}
	ctx := msgs[0].Context()
	select {
	case err := <-c.done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("wait for the bundle's publish: %w", ctx.Err())
	}
}

// send publishes what is queued, bundle after bundle. A caller (own set)
// sends until its own call is out, then hands the sender's role to a
// goroutine of its own if more wait: no caller waits for others' pushes
// past its own. A sender without a call of its own sends until nothing
// is queued.
func (b *Bundler) send(topic string, q *bundleQueue, own *bundleCall) {
	ownSent := false
	for {
		q.mu.Lock()
		if len(q.calls) == 0 {
			q.sending--
			q.mu.Unlock()
			return
		}
		if ownSent {
			q.mu.Unlock()
			go b.send(topic, q, nil) // keeps the sending slot
			return
		}
		calls := take(&q.calls)
		q.mu.Unlock()

		err := b.publishSafe(topic, calls)
		for _, c := range calls {
			c.done <- err
			ownSent = ownSent || c == own
		}
	}
}

// publishSafe is publish turning a panic (in a broker adapter) into the
// error every caller of the bundle gets, so that none waits for ever and
// the sending slot is not lost.
func (b *Bundler) publishSafe(topic string, calls []*bundleCall) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("publish to %s panicked: %v", topic, v)
		}
	}()
	return b.publish(topic, calls)
}

// take removes from the front of calls those that fit in one bundle: at
// least one call, and whole calls only.
func take(calls *[]*bundleCall) []*bundleCall {
	n, msgs, size := 0, 0, 0
	for _, c := range *calls {
		cs := 0
		for _, m := range c.msgs {
			cs += entrySize(m)
		}
		if n > 0 && (msgs+len(c.msgs) > MaxBundle || size+cs > MaxBundleBytes) {
			break
		}
		n, msgs, size = n+1, msgs+len(c.msgs), size+cs
	}
	out := (*calls)[:n:n]
	*calls = (*calls)[n:]
	return out
}

// entrySize bounds what m adds to a bundle's body: its id, payload and
// metadata (a mid push's mid_keys can be as large as its message), with
// protobuf's tags and lengths.
func entrySize(m *message.Message) int {
	n := len(m.UUID) + len(m.Payload) + 16
	for k, v := range m.Metadata {
		n += len(k) + len(v) + 8
	}
	return n
}

// publish sends calls' messages in as few bundles as the limits allow, in
// one call to the broker. The bundles' context has the latest deadline
// of the messages': none of the callers is cut short by another's.
func (b *Bundler) publish(topic string, calls []*bundleCall) error {
	var msgs []*message.Message
	for _, c := range calls {
		msgs = append(msgs, c.msgs...)
	}
	if len(msgs) == 1 {
		return b.pub.Publish(topic, msgs[0])
	}
	ctx, cancel := latestDeadline(msgs)
	defer cancel()
	var out []*message.Message
	for len(msgs) > 0 {
		n, size := 0, 0
		for n < len(msgs) && n < MaxBundle && (n == 0 || size+entrySize(msgs[n]) <= MaxBundleBytes) {
			size += entrySize(msgs[n])
			n++
		}
		m, err := NewBundle(msgs[:n])
		if err != nil {
			return err
		}
		m.SetContext(ctx)
		out = append(out, m)
		msgs = msgs[n:]
	}
	return b.pub.Publish(topic, out...)
}

// latestDeadline is a context that ends at the latest deadline among
// msgs' contexts, or never if one has none; cancelling one caller's
// request does not end it.
func latestDeadline(msgs []*message.Message) (context.Context, context.CancelFunc) {
	var latest time.Time
	for _, m := range msgs {
		d, ok := m.Context().Deadline()
		if !ok {
			return context.Background(), func() {}
		}
		if d.After(latest) {
			latest = d
		}
	}
	return context.WithDeadline(context.Background(), latest)
}

// Close closes the publisher beneath.
func (b *Bundler) Close() error { return b.pub.Close() }

// NewBundle packs msgs (their ids, metadata and payloads) into one
// message; one alone is returned as it is.
func NewBundle(msgs []*message.Message) (*message.Message, error) {
	if len(msgs) == 1 {
		return msgs[0], nil
	}
	body, err := encodeBundle(msgs)
	if err != nil {
		return nil, fmt.Errorf("bundle: %w", err)
	}
	id := uuid.NewString()
	out := message.NewMessage(id, body)
	out.Metadata.Set(MetaMessageID, id)
	out.Metadata.Set(MetaBundle, strconv.Itoa(len(msgs)))
	out.Metadata.Set(MetaPublishedAt, strconv.FormatInt(time.Now().UnixNano(), 10))
	return out, nil
}

// Unbundle returns the messages a bundle carries, each with the bundle's
// context; a message that is no bundle is returned alone.
func Unbundle(msg *message.Message) ([]*message.Message, error) {
	if msg.Metadata.Get(MetaBundle) == "" {
		return []*message.Message{msg}, nil
	}
	out, err := DecodeBundle(msg.Payload)
	if err != nil {
		return nil, fmt.Errorf("decode bundle %s: %w", msg.UUID, err)
	}
	for _, m := range out {
		m.SetContext(msg.Context())
	}
	return out, nil
}

// unbundle runs a message that is no bundle (or does not decode: it is
// poisoned as it is) down chain, and each message of a bundle through
// each, all at once (each on its own goroutine, as Watermill runs a
// message), so that each is deduplicated, retried, held and poisoned
// alone, and a bundle takes no longer than its slowest message
// (config.JobWorstCase holds per bundle). The bundle is acked when every
// message was settled — delivered, dropped as a duplicate or poisoned —
// and nacked if any failed to be (a poison publish failed, a message
// handed back at shutdown): it comes again whole, and the dedupe
// middleware drops those already delivered.
//
// each gets the context of a bundled message's first attempt: one for the
// whole bundle, ending timeout after the bundle began (0: the bundle's
// own), since its messages all start at once. A context with a deadline
// per message registered itself with the bundle's, under its lock: 13 %
// of a standalone node's CPU in batches of 100 (pprof, issue 15).
//
// all, if not nil, takes a bundle's messages together instead of each
// (firstTry.tryAll).
func unbundle(chain message.HandlerFunc, each func(attempt context.Context, msg *message.Message) ([]*message.Message, error), all func(attempt context.Context, msgs []*message.Message) ([]*message.Message, error), timeout time.Duration) message.HandlerFunc {
	return func(msg *message.Message) ([]*message.Message, error) {
		if msg.Metadata.Get(MetaBundle) == "" {
			return chain(msg)
		}
		msgs, err := Unbundle(msg)
		if err != nil {
			return chain(msg)
		}
		attempt := context.WithValue(msg.Context(), attemptStartKey{}, time.Now())
		if timeout > 0 {
			var cancel context.CancelFunc
			attempt, cancel = context.WithTimeout(attempt, timeout)
			defer cancel()
		}
		if all != nil {
			return all(attempt, msgs)
		}
		return eachAtOnce(msgs, func(m *message.Message) ([]*message.Message, error) { return each(attempt, m) })
	}
}

// eachAtOnce runs h on each message, all at once, each on a goroutine of
// its own, and joins what they produce and their errors.
func eachAtOnce(msgs []*message.Message, h message.HandlerFunc) ([]*message.Message, error) {
	produced := make([][]*message.Message, len(msgs))
	errs := make([]error, len(msgs))
	var wg sync.WaitGroup
	for i, m := range msgs {
		wg.Go(func() { produced[i], errs[i] = h(m) })
	}
	wg.Wait()
	return joined(produced, errs)
}

// joined is what the messages of a bundle produced, and their errors.
func joined(produced [][]*message.Message, errs []error) ([]*message.Message, error) {
	var out []*message.Message
	for _, p := range produced {
		out = append(out, p...)
	}
	return out, errors.Join(errs...)
}

// Starter begins a message's delivery and returns at once; wait returns
// what the handler would have returned for it. A Starter must not block
// (it runs on the bundle's goroutine, one message after another), and
// what it runs on goroutines of its own must not panic out of them.
type Starter func(msg *message.Message) (wait func() error)

// tryAll is try for a bundle's messages with an in-process dedupe store
// (or none): each is checked and started in turn on the bundle's
// goroutine, then each is waited for. One whose check, start or wait
// fails goes down retry at once, on a goroutine of its own, as after try;
// tryAll returns when all are settled, with what retry produced and the
// errors joined.
func (f *firstTry) tryAll(msgs []*message.Message, start Starter, attemptCtx context.Context, retry message.HandlerFunc) ([]*message.Message, error) {
	produced := make([][]*message.Message, len(msgs))
	errs := make([]error, len(msgs))
	var retries sync.WaitGroup
	fallback := func(i int, m *message.Message) {
		retries.Go(func() { produced[i], errs[i] = retry(m) })
	}
	waits := make([]func() error, len(msgs))
	origs := make([]context.Context, len(msgs))
	for i, m := range msgs {
		seen, err := f.duplicate(m)
		if err != nil {
			fallback(i, m)
			continue
		}
		if seen {
			continue
		}
		origs[i] = m.Context()
		m.SetContext(attemptCtx)
		waits[i] = started(start, m)
	}
	for i, m := range msgs {
		if waits[i] == nil {
			continue
		}
		err := waited(waits[i])
		m.SetContext(origs[i])
		if err != nil {
			fallback(i, m)
			continue
		}
		f.markDelivered(m)
	}
	retries.Wait()
	return joined(produced, errs)
}

// attemptStartKey holds when a bundle's first tries began (AttemptStart).
type attemptStartKey struct{}

// AttemptStart is when the bundle whose first try ctx belongs to began
// to be handled, after the broker gave it: every push in it was accepted
// before then. False outside a bundle's first try.
func AttemptStart(ctx context.Context) (time.Time, bool) {
	t, ok := ctx.Value(attemptStartKey{}).(time.Time)
	return t, ok
}

// errPanicked is a first try that panicked: a failure, which the stack's
// Recoverer then meets on the retry.
var errPanicked = errors.New("handler panicked")

// started runs start, a panic in it being the try's failure.
func started(start Starter, m *message.Message) (wait func() error) {
	defer func() {
		if recover() != nil {
			wait = func() error { return errPanicked }
		}
	}()
	wait = start(m)
	if wait == nil {
		return func() error { return nil }
	}
	return wait
}

// waited runs wait, a panic in it being the try's failure.
func waited(wait func() error) (err error) {
	defer func() {
		if recover() != nil {
			err = errPanicked
		}
	}()
	return wait()
}

// firstTry is a bundled message's first attempt, straight to the handler:
// the middleware between them works only when an attempt fails (retry,
// holds, poison) or for its bookkeeping, and cost 27 % of a standalone
// node's CPU in batches of 100 (pprof; the handler 8 %). The try keeps
// what must hold for every message: the dedupe check before and mark
// after (the dedupe middleware's store), job.timeout on the attempt, and
// a panic taken for a failure. A message whose try fails, or whose dedupe
// check errs, goes down the stack with one retry fewer, as if the try had
// been its first attempt; what the handler recorded in its metadata (the
// nodes it reached) goes with it.
type firstTry struct {
	store   DedupeStore // nil: dedupe off
	ttl     time.Duration
	timeout time.Duration
	observe func(result string)
	logger  *slog.Logger
}

// try reports whether msg was settled: delivered, or dropped as a
// duplicate. It does not grow its goroutine's stack up front as the
// stack's first middleware does (growStack): the try's calls are
// shallower, and the runtime starts goroutines at the stacks they have
// been using; the forced 16 KB step cost a bundled push 5 µs of CPU
// (batches of 100 standalone: 114–125k pushes/s at 14.6–16 µs with it,
// 169–175k at 10.4–10.8 µs without; one gRPC stream from 80–93k to
// 120k).
func (f *firstTry) try(msg *message.Message, handler message.HandlerFunc, attemptCtx context.Context) bool {
	orig := msg.Context()
	seen, err := f.duplicate(msg)
	if err != nil {
		return false
	}
	if seen {
		return true
	}
	// job.timeout from the bundle's start (unbundle); unless the dedupe
	// check took a tenth of it (a slow store), when the attempt gets a
	// whole job.timeout of its own, as it did before the bundle's was
	// shared.
	if dl, ok := attemptCtx.Deadline(); ok && time.Until(dl) < f.timeout-f.timeout/10 {
		var cancel context.CancelFunc
		attemptCtx, cancel = context.WithTimeout(orig, f.timeout)
		defer cancel()
	}
	msg.SetContext(attemptCtx)
	ok := attempt(handler, msg)
	msg.SetContext(orig)
	if !ok {
		return false
	}
	f.markDelivered(msg)
	return true
}

// duplicate reports whether the dedupe store has msg as delivered, and
// observes it if so; err: the store did not answer. A message without an
// id, or with dedupe off, is none.
func (f *firstTry) duplicate(msg *message.Message) (bool, error) {
	id := msg.Metadata.Get(MetaMessageID)
	if f.store == nil || id == "" {
		return false, nil
	}
	ctx, cancel := f.bounded(msg.Context())
	defer cancel()
	seen, err := f.store.Delivered(ctx, id)
	if err == nil && seen {
		f.observe("duplicate")
	}
	return seen, err
}

// markDelivered records msg as delivered in the dedupe store; a failure
// is logged (a redelivery would then go out again).
func (f *firstTry) markDelivered(msg *message.Message) {
	id := msg.Metadata.Get(MetaMessageID)
	if f.store == nil || id == "" {
		return
	}
	ctx, cancel := f.bounded(msg.Context())
	defer cancel()
	if err := f.store.MarkDelivered(ctx, id, f.ttl); err != nil {
		f.logger.Warn("remember delivered message", "message_id", id, "err", err)
	}
}

// bounded is ctx for one dedupe store call: as it is for an in-process
// store, which does not block, and within SettleTimeout for any other.
func (f *firstTry) bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := f.store.(InProcess); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, SettleTimeout)
}

// attempt runs handler once; a panic is a failure, which the stack's
// Recoverer then meets on the retry.
func attempt(handler message.HandlerFunc, msg *message.Message) (ok bool) {
	defer func() {
		if recover() != nil {
			ok = false
		}
	}()
	_, err := handler(msg)
	return err == nil
}
