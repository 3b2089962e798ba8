package cloud

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline"
	"imcloud/pipeline/events"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// Acks (issue 12, op 23). A client that opted in (the recover claim)
// acknowledges positions of its user stream, cumulatively; with
// history.user.acks on, logic keeps the user's cursor and a new
// connection naming no user-stream position starts after it. The node
// checks each ack against what the connection was sent, keeps the latest
// position per user, and sends each user's latest to logic's Ack at most
// once per ackFlushEvery: a client acking every message costs logic one
// call per interval, not one per message.
//
// What an op 23 gets (README, "op 23 — ack"):
//   - from a connection that did not opt in: close 1002, as is a
//     malformed body;
//   - with acks off for the user (ConnectReply.acks false): ignored;
//   - an epoch that is not the user stream's as this connection knows
//     it: dropped (history was lost; those messages are gone anyway);
//   - a position this connection was not sent: close 4422;
//   - a position not past what the connection acked already: a no-op;
//   - otherwise queued for logic; once logic took it, the acked event.

// closeAckUnsent closes a connection that acked a position it was not
// sent.
const closeAckUnsent = 4422

const (
	// ackFlushEvery is how often a node sends its users' acks to logic.
	// A user's ack waits at most this long; 100 ms is under what a
	// person notices and makes a client acking every message of a
	// 1,000 messages/s stream cost logic 10 calls a second.
	ackFlushEvery = 100 * time.Millisecond
	// ackFlushAt sends the pending acks before the interval is out once
	// this many users have one, so that a burst of users does not wait
	// behind one big flush.
	ackFlushAt = 1024
	// maxAckPending bounds the users with an ack waiting (about 100 bytes
	// each: 6.5 MB). Past it a new user's ack is dropped, counted and
	// logged: a later ack (cumulative) covers it.
	maxAckPending = 65_536
	// ackCallsInFlight bounds the Ack calls to logic at once.
	ackCallsInFlight = 16
	// ackTries is how often an ack logic could not take (unavailable, a
	// timeout) is sent before it is given up; a later ack covers it.
	ackTries = 3
)

// errAckUnsent is an ack of a position the connection was not sent.
var errAckUnsent = errors.New("ack of a position this connection was not sent")

// connAcks is the side of acks of a connection that opted in; the
// others have none (8 bytes of pointer rather than 64 on every
// connection). on is set at handshake, before the connection is shared;
// the rest is guarded by mu.
type connAcks struct {
	on bool // ConnectReply.acks: the user's stream keeps acks

	mu sync.Mutex
	// epoch is the user stream's epoch as the connection knows it: from
	// logic at connect, then from the messages it is sent.
	epoch string
	// top is the stream's last position when the connection opened:
	// those messages existed before it, and an earlier connection of
	// this client may have had them, so acking them is no abuse.
	top uint64
	// sent is the highest position of the user stream queued for this
	// connection since; acked the highest it acknowledged.
	sent, acked uint64
}

// newConnAcks is a connection's ack state from logic's ConnectReply;
// nil when the client did not opt in.
func newConnAcks(reply *pb.ConnectReply) *connAcks {
	if !reply.Recover {
		return nil
	}
	a := &connAcks{on: reply.Acks}
	if !a.on {
		return a
	}
	user := pipeline.UserStream(reply.Mid)
	if top := findTop(reply.Tops, user); top != nil && top.Epoch != "" {
		a.epoch, a.top = top.Epoch, top.Pos
	}
	if acked := reply.Acked; acked != nil && acked.Epoch != "" && (a.epoch == "" || acked.Epoch == a.epoch) {
		a.epoch, a.acked = acked.Epoch, acked.Pos
		a.top = max(a.top, acked.Pos)
	}
	return a
}

// noteSent records that the user stream's position pos of epoch is on its
// way to the connection; a new epoch starts the connection's record
// again (the stream's history was lost).
func (a *connAcks) noteSent(epoch string, pos uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if epoch != a.epoch {
		a.epoch, a.top, a.sent, a.acked = epoch, 0, pos, 0
		return
	}
	a.sent = max(a.sent, pos)
}

// noteUserProto records p's user-stream position, if it has one, for a
// connection that acks. Every key and mid push handed to a connection
// passes here (deliveredItem), live, released from a hold or filled from
// history.
func (c *channel) noteUserProto(p *pb.Proto) {
	if c.ackTrack == nil || !c.ackTrack.on || len(p.GetPositions()) == 0 {
		return
	}
	if sp := posFor(p, pipeline.UserStream(c.mid)); sp != nil {
		c.noteUserSent(sp.Epoch, sp.Pos)
	}
}

// noteUserSent records that the connection was given its user stream's
// position pos of epoch. A path that does not pass deliveredItem (a
// recovery's entries, a recovered position the client named) calls it
// too, so that the client may ack what it got.
func (c *channel) noteUserSent(epoch string, pos uint64) {
	if c.ackTrack != nil && c.ackTrack.on && epoch != "" {
		c.ackTrack.noteSent(epoch, pos)
	}
}

// check says what to do with an ack of (epoch, pos): queue it (forward),
// or not; errAckUnsent for a position the connection was not sent.
func (a *connAcks) check(epoch string, pos uint64) (forward bool, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.epoch == "" || epoch != a.epoch:
		return false, nil // foreign epoch: dropped
	case pos > max(a.top, a.sent):
		return false, fmt.Errorf("%w: position %d, sent up to %d", errAckUnsent, pos, max(a.top, a.sent))
	case pos <= a.acked:
		return false, nil // nothing new
	}
	a.acked = pos
	return true, nil
}

// handleAck serves an op 23 packet's body.
func (s *Stage) handleAck(ch *channel, body []byte) error {
	if ch.ackTrack == nil {
		return fmt.Errorf("%w: op 23 from a connection that did not opt in (the recover claim)", errProtocol)
	}
	epoch, pos, err := wire.DecodeAck(body)
	if err != nil {
		return fmt.Errorf("%w: op 23: %w", errProtocol, err)
	}
	if !ch.ackTrack.on {
		s.acker.ignored.Add(1)
		return nil
	}
	forward, err := ch.ackTrack.check(epoch, pos)
	if err != nil {
		n := s.acker.refused.Add(1)
		s.acker.log.Log("client acked a position it was not sent; closed with 4422", "mid", ch.mid, "key", ch.key, "err", err, "refused", n)
		ch.close(closeAckUnsent, "ack of a position not sent")
		return err
	}
	if !forward {
		s.acker.dropped.Add(1)
		return nil
	}
	s.acker.add(ch, epoch, pos)
	return nil
}

// acker batches a node's acks per user and sends them to logic.
type acker struct {
	s     *Stage
	start sync.Once
	kick  chan struct{} // something is pending
	full  chan struct{} // ackFlushAt users are pending

	mu      sync.Mutex
	pending map[ackKey]*pendingAck
	stopped bool // the flusher ended (the node drains): add flushes inline
	// flushMu is held by a flush: one at a time, and drain's, taken
	// last, waits for the one running.
	flushMu sync.Mutex

	// sent counts the Ack calls made; failed those logic did not take
	// (each kind logged once per logEvery); refused the acks of
	// positions not sent (4422); ignored those with acks off; dropped
	// the acks that moved nothing (foreign epoch, not forward) and those
	// over maxAckPending; overflow the latter alone.
	sent, failed, refused, ignored, dropped, overflow atomic.Int64
	log                                               *pipeline.RateLog
}

// ackKey is one user's stream in one epoch: two connections of a user
// may, for a moment, know different epochs.
type ackKey struct {
	mid   int64
	epoch string
}

// pendingAck is the latest position acked for a key, and the connection
// that acked it (closed with 4422 if logic says the position never was).
type pendingAck struct {
	pos   uint64
	ch    *channel
	tries int
}

func newAcker(s *Stage) *acker {
	return &acker{s: s, kick: make(chan struct{}, 1), full: make(chan struct{}, 1), pending: map[ackKey]*pendingAck{},
		log: pipeline.NewRateLog(s.logger, slog.LevelWarn, logEvery)}
}

// add queues ch's ack of pos for its user, keeping the latest position.
func (a *acker) add(ch *channel, epoch string, pos uint64) {
	a.start.Do(func() { go a.run(a.s.pacedCtx) })
	k := ackKey{mid: ch.mid, epoch: epoch}
	a.mu.Lock()
	if a.stopped {
		a.mu.Unlock()
		a.flush(map[ackKey]*pendingAck{k: {pos: pos, ch: ch}})
		return
	}
	if p := a.pending[k]; p != nil {
		if pos > p.pos {
			p.pos, p.ch, p.tries = pos, ch, 0
		}
		a.mu.Unlock()
		return
	}
	if len(a.pending) >= maxAckPending {
		a.mu.Unlock()
		a.dropped.Add(1)
		n := a.overflow.Add(1)
		a.log.Log("too many users with acks pending; ack dropped (a later one covers it)", "mid", ch.mid, "pending", maxAckPending, "overflow", n)
		return
	}
	a.pending[k] = &pendingAck{pos: pos, ch: ch}
	n := len(a.pending)
	a.mu.Unlock()
	if n == 1 {
		signal(a.kick)
	}
	if n == ackFlushAt {
		signal(a.full)
	}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// run sends the pending acks every ackFlushEvery while there are some,
// until ctx ends (the node drains); then it sends what is left, and acks
// coming after are sent as they come.
func (a *acker) run(ctx context.Context) {
	t := time.NewTimer(ackFlushEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			a.drain()
			return
		case <-a.kick:
		}
		t.Reset(ackFlushEvery)
		select {
		case <-ctx.Done():
		case <-t.C:
		case <-a.full:
		}
		a.mu.Lock()
		batch := a.take()
		a.mu.Unlock()
		a.flush(batch)
	}
}

// drain sends what is pending and what later acks bring, inline from
// now on, and returns once every flush begun has been answered: Drain
// calls it when the node's sessions have ended, so that the last acks of
// its clients reach logic before the process exits.
func (a *acker) drain() {
	a.mu.Lock()
	a.stopped = true
	batch := a.take()
	a.mu.Unlock()
	a.flush(batch)
}

// take empties pending; a.mu is held.
func (a *acker) take() map[ackKey]*pendingAck {
	batch := a.pending
	a.pending = make(map[ackKey]*pendingAck, len(batch))
	// Drained flags would say "pending" for acks already taken.
	select {
	case <-a.full:
	default:
	}
	return batch
}

// flush sends each user's ack to logic, ackCallsInFlight at a time, and
// returns when all are answered: a user's next ack is sent after this one.
func (a *acker) flush(batch map[ackKey]*pendingAck) {
	a.flushMu.Lock()
	defer a.flushMu.Unlock()
	if len(batch) == 0 {
		return
	}
	slots := make(chan struct{}, ackCallsInFlight)
	var wg sync.WaitGroup
	for k, p := range batch {
		slots <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-slots; wg.Done() }()
			a.send(k, p)
		}()
	}
	wg.Wait()
}

// send makes one Ack call and acts on its answer.
func (a *acker) send(k ackKey, p *pendingAck) {
	ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
	defer cancel()
	a.sent.Add(1)
	_, err := a.s.logic.Ack(ctx, &pb.AckReq{Mid: k.mid, Epoch: k.epoch, Pos: p.pos})
	stream := pipeline.UserStream(k.mid)
	switch status.Code(err) {
	case codes.OK:
		a.s.events.Acked(a.s.nodeID, k.mid, p.ch.key, events.Position{Stream: stream, Epoch: k.epoch, Pos: p.pos})
		return
	case codes.OutOfRange:
		// Past the stream's last: the connection's record let through a
		// position no stream gave.
		a.refused.Add(1)
		a.failed.Add(1)
		a.log.Log("logic refused an ack past the user stream's last position; client closed with 4422", "mid", k.mid, "key", p.ch.key, "pos", p.pos, "err", err)
		p.ch.close(closeAckUnsent, "ack of a position not sent")
		return
	case codes.FailedPrecondition, codes.InvalidArgument:
		// The epoch changed since (history lost), or logic's acks are
		// off: nothing to keep, nothing to retry.
		n := a.failed.Add(1)
		a.log.Log("logic did not take an ack; dropped", "mid", k.mid, "stream", stream, "pos", p.pos, "err", err, "failed", n)
		return
	}
	n := a.failed.Add(1)
	p.tries++
	if p.tries >= ackTries {
		a.log.Log("send ack to logic; given up (a later ack covers it, else the messages are sent again)", "mid", k.mid, "pos", p.pos, "tries", p.tries, "err", err, "failed", n)
		return
	}
	a.log.Log("send ack to logic; will retry", "mid", k.mid, "pos", p.pos, "tries", p.tries, "err", err, "failed", n)
	a.requeue(k, p)
}

// requeue puts back an ack logic could not take, unless a later one for
// the user came meanwhile.
func (a *acker) requeue(k ackKey, p *pendingAck) {
	a.mu.Lock()
	if a.stopped {
		a.mu.Unlock()
		return
	}
	cur := a.pending[k]
	switch {
	case cur == nil && len(a.pending) < maxAckPending:
		a.pending[k] = p
	case cur != nil && cur.pos < p.pos:
		cur.pos, cur.ch, cur.tries = p.pos, p.ch, p.tries
	}
	n := len(a.pending)
	a.mu.Unlock()
	if n > 0 {
		signal(a.kick)
	}
}

// AckFailures counts the acks logic did not take (refused, or the call
// failed).
func (s *Stage) AckFailures() int64 { return s.acker.failed.Load() }

// AckCalls counts the Ack calls made to logic.
func (s *Stage) AckCalls() int64 { return s.acker.sent.Load() }
