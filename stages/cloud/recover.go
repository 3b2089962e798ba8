package cloud

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"runtime/debug"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// Recovery (issue 12, README "Positioned delivery, recovery and acks").
// A connection that opted in holds its positioned pushes from its
// handshake until its first op 21 (or until another packet or
// cloud.handshake_timeout ends the hold as an op 21 naming no stream
// would). Recovery then asks logic's History, for each stream named,
// whether what the client missed can be served (one entry per stream: op
// 22 needs no more), answers op 22, queues the missed entries as op 20 at
// the client's pace — read a page at a time, only for the stream being
// sent, within the node's byte budget — and releases what was held,
// dropping what recovery already sent: no gap, no duplicate at the seam.
// From then
// on a push at or below a stream's floor (the last position recovery
// sent, or where op 8 said the stream starts) is never sent again — a
// message accepted before the History read but still in flight from job.

// Bounds of recovery.
const (
	// maxRecoverCalls bounds the History calls recoveries make at once
	// on a node: a reconnect storm of 10,000 clients waits its turn
	// rather than open 10,000 calls. A connection holds a slot for the
	// calls that settle its op 22 (one per stream it names, each asking
	// one entry) and takes one per page it sends.
	maxRecoverCalls = 64
	// recoverPage is the entries one History call of a recovery asks for.
	// Pages are read only for the stream being sent, one at a time: a
	// connection pins at most one page (100 × the 4 KB body limit), and
	// only while it is being queued.
	recoverPage = 100
	// recoverEntryCost is what an entry is counted as before its page is
	// read: logic's default body limit and room for its id and position.
	// Once read, an entry counts its body's length and the same extra.
	recoverEntryCost  = 4096 + recoverEntryExtra
	recoverEntryExtra = 128
	// maxRecoverEntries bounds what one stream's recovery sends: a client
	// further behind (history configured larger) is answered "trimmed"
	// and resyncs from the application instead.
	maxRecoverEntries = 10_000
	// maxRecoverHeld and maxRecoverHeldBytes bound the live positioned
	// pushes held for a connection until its recovery ends: 1,024 is ten
	// seconds of a room at 100 messages/s. Past either, what is held is
	// let go and only each stream's range of positions kept: recovery
	// reads those from history after the rest (catchUp), so a room faster
	// than a recovery costs a history read, not the connection.
	maxRecoverHeld      = 1024
	maxRecoverHeldBytes = 1 << 20
	// maxRecoverCatchUps bounds those reads: a recovery that still lets
	// go of live pushes after as many passes is behind a room it cannot
	// catch (the pace rule closes a client that reads too slowly; this,
	// one whose history reads do), and its client is closed with
	// closeRecoverAgain, to reconnect and recover from its positions.
	maxRecoverCatchUps = 8
	// recoverBudgetWait is the longest a recovery waits for the node's
	// byte budget before its client is closed to recover again: the
	// budget's holders free it within about 17 s at worst (the pace
	// rule's 10 s grace and a 400 KB page at 64 KiB/s).
	recoverBudgetWait = 30 * time.Second
)

// recoverBounds are the node-wide memory bound and the pace rule of
// recoveries (defaultRecoverBounds; tests make them small).
type recoverBounds struct {
	// bytes bounds the history pages all recoveries of the node pin at
	// once (entries read and not yet queued to their connection).
	bytes int64
	// grace, rate and perEntry make the pace rule: by grace + (bytes
	// queued)/rate + (entries queued) × perEntry after it began (time
	// spent waiting for the node's slots, pinned bytes and logic not
	// counted), a recovery must have queued what it queued. A client
	// that reads slower is closed as a slow consumer and its page
	// released: it reconnects and recovers from its positions.
	grace    time.Duration
	rate     int64 // bytes per second
	perEntry time.Duration
	// held is how many live pushes a connection's hold keeps
	// (maxRecoverHeld).
	held int
}

// defaultRecoverBounds: 32 MiB is 78 full pages (100 × 4 KB) at once —
// more than maxRecoverCalls can read at once — and what a storm of
// clients 50 messages behind pins is a fraction of it. 64 KiB/s (a slow
// mobile link) after a grace of the write deadline (10 s): a client
// reading one 4 KB packet every 9 s falls behind within about 10 s and
// frees its page, where a deadline per packet kept it forever.
func defaultRecoverBounds() recoverBounds {
	return recoverBounds{bytes: 32 << 20, grace: writeDeadline, rate: 64 << 10, perEntry: time.Millisecond, held: maxRecoverHeld}
}

// byteBudget is a node-wide count of bytes pinned, with waiting: a
// semaphore in bytes.
type byteBudget struct {
	mu         sync.Mutex
	max        int64
	used, peak int64
	freed      chan struct{} // closed (and replaced) when bytes are released
}

func newByteBudget(max int64) *byteBudget {
	return &byteBudget{max: max, freed: make(chan struct{})}
}

// acquire takes n bytes, waiting for them until deadline or gone; one
// taker alone may take more than max (it could never be served else).
func (b *byteBudget) acquire(n int64, deadline time.Time, gone func() bool) bool {
	for {
		b.mu.Lock()
		if b.used+n <= b.max || b.used == 0 {
			b.used += n
			b.peak = max(b.peak, b.used)
			b.mu.Unlock()
			return true
		}
		freed := b.freed
		b.mu.Unlock()
		left := time.Until(deadline)
		if left <= 0 || gone() {
			return false
		}
		t := time.NewTimer(min(left, time.Second)) // a close does not signal freed
		select {
		case <-freed:
		case <-t.C:
		}
		t.Stop()
	}
}

// take takes n bytes now, over max if need be.
func (b *byteBudget) take(n int64) {
	b.mu.Lock()
	b.used += n
	b.peak = max(b.peak, b.used)
	b.mu.Unlock()
}

func (b *byteBudget) release(n int64) {
	if n <= 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	close(b.freed)
	b.freed = make(chan struct{})
	b.mu.Unlock()
}

// usage returns the bytes pinned now and the most ever pinned.
func (b *byteBudget) usage() (used, peak int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used, b.peak
}

// recoverPace is one recovery's progress rule (recoverBounds).
type recoverPace struct {
	b        recoverBounds
	deadline time.Time
}

func newRecoverPace(b recoverBounds) *recoverPace {
	return &recoverPace{b: b, deadline: time.Now().Add(b.grace)}
}

// queued credits a packet the client took.
func (p *recoverPace) queued(bytes int) {
	p.deadline = p.deadline.Add(p.b.perEntry + time.Duration(int64(bytes)*int64(time.Second)/p.b.rate))
}

// waited credits time spent on the node's side (slots, budget, logic).
func (p *recoverPace) waited(since time.Time) {
	p.deadline = p.deadline.Add(time.Since(since))
}

// recovering is a connection's hold: the live positioned pushes that came
// before its recovery ended. Guarded by the channel's mu.
type recovering struct {
	max   int // pushes held at most (recoverBounds.held)
	held  []outItem
	bytes int
	// let are the positions of the pushes let go when the hold was full,
	// per stream: recovery reads them from history (catchUp).
	let   map[string]*letRange
	timer *time.Timer // ends the hold at cloud.handshake_timeout
	// starts are where op 8 said each stream starts: the floors of the
	// streams op 21 does not name.
	starts []wire.StreamPos
}

// letRange is the positions of one stream's pushes a full hold let go.
// Pushes come in position order per stream (the orderer), so everything
// between min and max that was for this connection was let go too; a
// push of another epoch than the first makes the range unreadable.
type letRange struct {
	epoch    string
	min, max uint64
	epochs   bool // another epoch too
}

// hold keeps it; when the hold is full (max, or maxRecoverHeldBytes),
// it lets go of everything held, keeping only each stream's range.
func (r *recovering) hold(it outItem) {
	if len(r.held) >= r.max || r.bytes+len(it.pkt) > maxRecoverHeldBytes {
		for _, h := range r.held {
			r.letGo(h.sp)
		}
		clear(r.held)
		r.held, r.bytes = r.held[:0], 0
		r.letGo(it.sp)
		return
	}
	r.held = append(r.held, it)
	r.bytes += len(it.pkt)
}

func (r *recovering) letGo(sp *streamItem) {
	if r.let == nil {
		r.let = map[string]*letRange{}
	}
	l := r.let[sp.stream]
	switch {
	case l == nil:
		r.let[sp.stream] = &letRange{epoch: sp.epoch, min: sp.pos, max: sp.pos}
	case l.epoch != sp.epoch:
		l.epochs = true
	default:
		l.min, l.max = min(l.min, sp.pos), max(l.max, sp.pos)
	}
}

// takeLet returns the ranges let go since the last call and forgets them.
func (c *channel) takeLet() map[string]*letRange {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rec == nil {
		return nil
	}
	let := c.rec.let
	c.rec.let = nil
	return let
}

// belowFloor reports whether a positioned push was already sent, or is
// before where the connection's stream starts. c.mu is held.
func (c *channel) belowFloor(sp *streamItem) bool {
	f, ok := c.floors[sp.stream]
	return ok && f.Epoch == sp.epoch && sp.pos <= f.Pos
}

// sendRecovered queues a recovered packet, waiting while the queue is
// over half its bounds, so that a long recovery goes at the client's pace
// rather than closing it as a slow consumer — down to the pace's rule.
// False: the connection closed or fell behind the pace.
func (c *channel) sendRecovered(it outItem, pace *recoverPace) bool {
	for {
		c.mu.Lock()
		if c.closed || c.draining {
			c.mu.Unlock()
			return false
		}
		if !c.acceptsLocked(it.op) {
			c.mu.Unlock()
			return true
		}
		if len(c.queue) == 0 || len(c.queue) < c.limit/2 && c.queued+len(it.pkt) <= c.limitBytes/2 {
			c.queue = append(c.queue, it)
			c.queued += len(it.pkt)
			start := !c.writing && !c.held
			c.writing = c.writing || start
			c.mu.Unlock()
			if start {
				go c.flush()
			}
			pace.queued(len(it.pkt))
			return true
		}
		if c.space == nil {
			c.space = make(chan struct{}, 1)
		}
		space := c.space
		c.mu.Unlock()
		left := time.Until(pace.deadline)
		if left <= 0 {
			c.logger.Info("closing slow consumer: behind recovery's pace", "mid", c.mid, "key", c.key)
			c.slow.Add(1)
			c.close(closeSlowConsumer, "slow consumer")
			return false
		}
		t := time.NewTimer(min(left, time.Second)) // a close does not signal space
		select {
		case <-space:
		case <-t.C:
		}
		t.Stop()
	}
}

// endRecovery sets the connection's floors and releases what was held
// after the recovered packets, dropping what recovery sent. It ends
// nothing and reports false when the hold let pushes go since catchUp
// last looked (recovering.let): those are read first.
func (c *channel) endRecovery(floors map[string]wire.StreamPos) bool {
	c.mu.Lock()
	rec := c.rec
	if rec != nil && len(rec.let) > 0 && !c.closed {
		// The hold let pushes go since catchUp last looked: they are
		// read from history first, or they would be a gap.
		c.mu.Unlock()
		return false
	}
	c.rec = nil
	c.floors = floors
	if c.closed || rec == nil {
		c.mu.Unlock()
		return true
	}
	n := len(c.queue)
	for _, it := range rec.held {
		if c.belowFloor(it.sp) {
			continue
		}
		it.pkt = it.sp.packet(&it)
		c.queue = append(c.queue, it)
		c.queued += len(it.pkt)
	}
	// What was held was within maxRecoverHeld; it is queued past the
	// queue's bound rather than lost.
	start := len(c.queue) > n && !c.writing && !c.held
	c.writing = c.writing || start
	c.mu.Unlock()
	if start {
		go c.flush()
	}
	return true
}

// startHold ends a new opted-in connection's hold after
// cloud.handshake_timeout if no op 21 came.
func (s *Stage) startHold(ch *channel) {
	t := time.AfterFunc(s.cfg.HandshakeTimeout, func() {
		if !ch.isClosed() {
			_ = s.beginRecovery(ch, nil, 0, false)
		}
	})
	ch.mu.Lock()
	if ch.rec != nil {
		ch.rec.timer = t
	}
	ch.mu.Unlock()
}

// errRecoverTwice is a second op 21, or one after the hold ended.
var errRecoverTwice = fmt.Errorf("%w: op 21 after the connection's recovery began", errProtocol)

// recoverTask is one stream to recover.
type recoverTask struct {
	req   wire.StreamPos
	reply bool // named in op 21: answered in op 22
	// unacked: the user stream with acks on, not named: recovered from
	// the acknowledged position, or from the oldest kept when that is
	// gone.
	unacked bool
	res     wire.RecoverResult
	target  uint64 // recover through this position
}

// beginRecovery starts the connection's one recovery: streams named by op
// 21 (seq is its sequence; reply says op 22 is wanted), or none when
// another packet or the hold's timeout ended the hold.
func (s *Stage) beginRecovery(ch *channel, streams []wire.StreamPos, seq int32, reply bool) error {
	if ch.recoverBegun.Swap(true) {
		return errRecoverTwice
	}
	ch.mu.Lock()
	if ch.rec != nil && ch.rec.timer != nil {
		ch.rec.timer.Stop()
	}
	rooms := append([]string(nil), ch.rooms...)
	ch.mu.Unlock()
	user := pipeline.UserStream(ch.mid)
	tasks := make([]*recoverTask, 0, len(streams)+1)
	named := map[string]bool{}
	for _, sp := range streams {
		named[sp.Stream] = true
		t := &recoverTask{req: sp, reply: true}
		if !receives(sp.Stream, user, rooms) {
			t.res = wire.RecoverResult{Stream: sp.Stream, Reason: wire.ReasonForbidden, Epoch: sp.Epoch, Pos: sp.Pos}
		}
		tasks = append(tasks, t)
	}
	if !named[user] && ch.acks && ch.acked != nil {
		named[user] = true // not a start below
		tasks = append(tasks, &recoverTask{req: wire.StreamPos{Stream: user, Epoch: ch.acked.Epoch, Pos: ch.acked.Pos}, unacked: true})
	}
	// A stream op 21 does not name starts where op 8 said. Logic read
	// that position before the connection joined its rooms here: what
	// the node delivered in between never reached it. When the node's
	// stream moved past the position, the difference comes from history.
	for _, sp := range ch.starts() {
		if !named[sp.Stream] && s.order.movedPast(sp) {
			tasks = append(tasks, &recoverTask{req: sp})
		}
	}
	go s.recoverConn(ch, tasks, seq, reply, named)
	return nil
}

// movedPast reports whether the node delivered a position of sp's stream
// past sp (in its epoch).
func (o *orderer) movedPast(sp wire.StreamPos) bool {
	st := o.get(sp.Stream)
	if st == nil {
		return false
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.known && st.epoch == sp.Epoch && st.last > sp.Pos
}

// receives reports whether a connection of user's stream in rooms gets
// stream.
func receives(stream, user string, rooms []string) bool {
	if stream == user {
		return true
	}
	for _, r := range rooms {
		if pipeline.RoomStream(r) == stream {
			return true
		}
	}
	return false
}

// recoverConn runs a connection's recovery (see the top of the file).
func (s *Stage) recoverConn(ch *channel, tasks []*recoverTask, seq int32, reply bool, named map[string]bool) {
	defer func() {
		// Only this connection ends, as for a panic in its reader.
		if p := recover(); p != nil {
			s.logger.Error("panic recovering client; connection closed", "key", ch.key, "panic", p, "stack", string(debug.Stack()))
			ch.close(closeInternal, "internal error")
		}
	}()
	if err := s.settleTasks(ch, tasks); err != nil {
		s.recoverLog.Log("recover client: logic's history unavailable; client closed with 1013", "mid", ch.mid, "key", ch.key, "err", err)
		ch.close(closeCode(fmt.Errorf("%w: %w", errUpstream, err)))
		return
	}
	if reply {
		results := make([]wire.RecoverResult, 0, len(tasks))
		for _, t := range tasks {
			if t.reply {
				results = append(results, t.res)
			}
		}
		body, _ := wire.AppendRecoverReply(nil, results)
		ch.reply(outItem{pkt: wire.Encode(wire.OpRecoverReply, seq, body)})
	}
	floors := map[string]wire.StreamPos{}
	// A stream op 21 did not name starts where op 8 said.
	for _, sp := range ch.starts() {
		if !named[sp.Stream] {
			floors[sp.Stream] = sp
		}
	}
	pace := newRecoverPace(s.recoverBounds)
	for _, t := range tasks {
		if t.res.Reason == wire.ReasonForbidden {
			continue
		}
		switch {
		case !t.reply && !t.res.Recovered:
			// A start not filled: what it held goes out from the start
			// (the client sees the gap, as after a skipped position).
			floors[t.req.Stream] = t.req
		case t.res.Epoch != "":
			floors[t.res.Stream] = wire.StreamPos{Stream: t.res.Stream, Epoch: t.res.Epoch, Pos: t.res.Pos}
		}
		if !t.res.Recovered {
			continue
		}
		if err := s.sendMissed(ch, t, pace); err != nil {
			if !ch.ending() {
				s.recoverLog.Log("recover client: closed to recover again", "mid", ch.mid, "key", ch.key, "stream", t.res.Stream, "err", err)
				ch.close(closeRecoverAgain, "recovery interrupted, reconnect and recover")
			}
			return
		}
	}
	if err := s.catchUp(ch, floors, pace); err != nil && !ch.ending() {
		s.recoverLog.Log("recover client: closed to recover again", "mid", ch.mid, "key", ch.key, "err", err)
		ch.close(closeRecoverAgain, "recovery could not catch up, reconnect and recover")
	}
}

// errCatchUp: a recovery that could not read what its full hold let go.
var errCatchUp = errors.New("live pushes let go during recovery")

// catchUp reads from history what the connection's full hold let go
// (recovering.hold), after its floor in each stream, and moves the floor
// past it; pushes that come meanwhile are held again, and let go again
// if the hold fills, up to maxRecoverCatchUps passes in all. It ends the
// recovery when nothing was let go; endRecovery refuses while the hold
// has let pushes go since, and those are read in another pass.
func (s *Stage) catchUp(ch *channel, floors map[string]wire.StreamPos, pace *recoverPace) error {
	for pass := 0; ; {
		let := ch.takeLet()
		if len(let) == 0 {
			if ch.endRecovery(floors) {
				return nil
			}
			continue // the hold let pushes go just now: the next pass reads them
		}
		if pass == maxRecoverCatchUps {
			return fmt.Errorf("%w: still after %d passes", errCatchUp, pass)
		}
		pass++
		for _, stream := range slices.Sorted(maps.Keys(let)) {
			l := let[stream]
			if l.epochs {
				return fmt.Errorf("%w: %s changed epoch", errCatchUp, stream)
			}
			from := l.min - 1
			if f, ok := floors[stream]; ok {
				if f.Epoch != l.epoch {
					return fmt.Errorf("%w: %s moved from epoch %q to %q", errCatchUp, stream, f.Epoch, l.epoch)
				}
				from = f.Pos
			}
			if l.max <= from {
				continue
			}
			if l.max-from > maxRecoverEntries {
				return fmt.Errorf("%w: %s: %d positions", errCatchUp, stream, l.max-from)
			}
			t := &recoverTask{
				req:    wire.StreamPos{Stream: stream, Epoch: l.epoch, Pos: from},
				res:    wire.RecoverResult{Stream: stream, Epoch: l.epoch, Pos: l.max, Recovered: true},
				target: l.max,
			}
			if err := s.sendMissed(ch, t, pace); err != nil {
				return err
			}
			floors[stream] = wire.StreamPos{Stream: stream, Epoch: l.epoch, Pos: l.max}
		}
	}
}

// starts are where op 8 said the connection's streams start.
func (c *channel) starts() []wire.StreamPos {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rec == nil {
		return nil
	}
	return c.rec.starts
}

// ending reports whether the connection is closed or closing after its
// queue (a drain): either way nothing more is sent.
func (c *channel) ending() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed || c.draining
}

// settleTasks settles each task's result, holding one of the node's
// recovery slots. Each call asks one entry: op 22 needs the stream's top
// and whether the position can be served (and an unacked stream the
// oldest kept position), not the entries, which are read page by page as
// they are sent.
func (s *Stage) settleTasks(ch *channel, tasks []*recoverTask) error {
	s.recoverSlots <- struct{}{}
	defer func() { <-s.recoverSlots }()
	if ch.ending() {
		// Gone while it waited for a slot (a storm's client gave up).
		return nil
	}
	for _, t := range tasks {
		if t.res.Reason == wire.ReasonForbidden {
			continue
		}
		r, err := s.historyPage(t.req.Stream, t.req.Epoch, t.req.Pos, 1)
		if err != nil {
			if c := status.Code(err); c == codes.FailedPrecondition || c == codes.Unimplemented {
				// History is off: there is nothing to recover, nor any
				// position to drop at.
				t.res = wire.RecoverResult{Stream: t.req.Stream, Reason: wire.ReasonNoHistory, Epoch: t.req.Epoch, Pos: t.req.Pos}
				continue
			}
			return err
		}
		if t.unacked && (r.Unrecoverable == wire.ReasonTrimmed || r.Unrecoverable == wire.ReasonEpoch) {
			// Unacknowledged messages are the oldest kept ones, now.
			if r, err = s.historyPage(t.req.Stream, "", 0, 1); err != nil {
				return err
			}
			t.req.Epoch, t.req.Pos = r.GetTop().GetEpoch(), r.GetTop().GetPos()
			if r.Unrecoverable == "" && len(r.Entries) > 0 {
				t.req.Pos = r.Entries[0].Pos - 1
			}
		}
		settle(t, r)
	}
	return nil
}

// settle sets a task's result from its first call's reply.
func settle(t *recoverTask, r *pb.HistoryReply) {
	top := r.GetTop()
	t.res = wire.RecoverResult{Stream: t.req.Stream, Epoch: top.GetEpoch(), Pos: top.GetPos()}
	if t.res.Epoch == "" {
		// A logic that gives no top: the client's own position.
		t.res.Epoch, t.res.Pos = t.req.Epoch, t.req.Pos
	}
	switch {
	case r.Unrecoverable != "":
		t.res.Reason = r.Unrecoverable
	case top.GetPos() > t.req.Pos && top.GetPos()-t.req.Pos > maxRecoverEntries:
		t.res.Reason = wire.ReasonTrimmed
	default:
		t.res.Recovered = true
		t.target = max(top.GetPos(), t.req.Pos)
	}
}

// historyPage asks logic for up to limit entries of stream after pos.
func (s *Stage) historyPage(stream, epoch string, after uint64, limit int32) (*pb.HistoryReply, error) {
	ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
	defer cancel()
	r, err := s.logic.History(ctx, &pb.HistoryReq{Stream: stream, Epoch: epoch, After: after, Limit: limit})
	if err != nil {
		return nil, fmt.Errorf("history of %s after %d: %w", stream, after, err)
	}
	return r, nil
}

// errHistoryMoved: the history changed during a recovery (trimmed past
// the entries still to send, or a new epoch).
var errHistoryMoved = errors.New("history changed during recovery")

// errRecoverBusy: the node's recovery byte budget stayed taken for
// recoverBudgetWait.
var errRecoverBusy = errors.New("node's recovery memory busy")

// sendMissed queues a recovered stream's entries after the client's
// position through the task's target, page by page: a page is read only
// once the one before is queued, within the node's byte budget, and each
// entry's bytes are released as the client takes it.
func (s *Stage) sendMissed(ch *channel, t *recoverTask, pace *recoverPace) error {
	last, epoch := t.req.Pos, t.res.Epoch
	_, room := pipeline.StreamRoom(t.res.Stream)
	user := !room
	var pinned int64
	defer func() { s.recoverBytes.release(pinned) }()
	for last < t.target {
		// Pin a full page's worth before reading it: the reply is in
		// memory from the moment it arrives.
		want := int64(min(t.target-last, recoverPage))
		since := time.Now()
		if !s.recoverBytes.acquire(want*recoverEntryCost, since.Add(recoverBudgetWait), ch.ending) {
			return errRecoverBusy
		}
		pinned = want * recoverEntryCost
		s.recoverSlots <- struct{}{}
		r, err := s.historyPage(t.res.Stream, epoch, last, int32(want))
		<-s.recoverSlots
		pace.waited(since)
		if err != nil {
			return err
		}
		if r.Unrecoverable != "" || len(r.Entries) == 0 {
			return fmt.Errorf("%w: %s after %d: %q", errHistoryMoved, t.res.Stream, last, r.Unrecoverable)
		}
		entries := r.Entries
		// Count what came; an entry larger than guessed (logic allows
		// bodies over 4 KB) is kept only if the pinned bytes cover it or
		// it is the page's first: the rest is read again next page.
		var used int64
		for i, e := range entries {
			cost := int64(len(e.Body)) + recoverEntryExtra
			if i > 0 && used+cost > pinned {
				clear(entries[i:])
				entries = entries[:i]
				break
			}
			used += cost
		}
		if used > pinned {
			// One entry larger than a whole page's guess: pinned beyond
			// the budget rather than never sent (logic bounds bodies).
			s.recoverBytes.take(used - pinned)
			pinned = used
		}
		s.recoverBytes.release(pinned - used)
		pinned = used
		r = nil
		for i, e := range entries {
			entries[i] = nil
			cost := int64(len(e.Body)) + recoverEntryExtra
			if e.Pos <= last || e.Pos > t.target {
				s.recoverBytes.release(cost)
				pinned -= cost
				continue
			}
			if e.Pos != last+1 {
				return fmt.Errorf("%w: %s jumped from %d to %d", errHistoryMoved, t.res.Stream, last, e.Pos)
			}
			last = e.Pos
			// A void position (its message never accepted) sends
			// nothing; a key push goes only to a connection of its keys:
			// a recovering device gets what was for it or for the whole
			// user, not what another device of the user was sent.
			if !e.Void && e.Op >= wire.MinBusinessOp && (!user || entryFor(e, ch.key)) {
				pkt, err := wire.AppendStreamMsg(nil, 0, t.res.Stream, epoch, e.Pos, e.Op, e.Body)
				if err != nil {
					return fmt.Errorf("encode %s at %d: %w", t.res.Stream, e.Pos, err)
				}
				it := outItem{pkt: pkt, op: e.Op, push: true}
				if user {
					p := &pb.Proto{Id: e.Id, Op: e.Op, Positions: []*pb.StreamPos{{Stream: t.res.Stream, Epoch: epoch, Pos: e.Pos}}}
					it = s.deliveredItem(it, ch, p)
				}
				if !ch.sendRecovered(it, pace) {
					return errors.New("connection closed, or too slow, during recovery")
				}
			}
			s.recoverBytes.release(cost)
			pinned -= cost
		}
	}
	return nil
}
