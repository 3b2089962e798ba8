package cloud

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// Order at the node (issue 12). Logic gives every room and user push a
// position in its stream; job delivers them concurrently and retries, so
// they may come here in any order and more than once. The orderer keeps,
// per stream some client of this node is in, the last position it
// delivered: the next one goes out at once (with the held ones after it),
// an old one is a duplicate, a later one waits for the gap to fill — from
// job, or after cloud.order_gap_wait from logic's history. Pushes without
// positions (broadcasts, history off, an older logic or job) go out as
// they come, as before.
//
// Every client of the node gets the order, opted in to recovery or not:
// the frames do not change, only when they are written.
//
// A gap that is not a loss: a key push takes a position in its user's
// stream but job sends it only to the node of its keys, and a void
// position (its publish failed after Append; the push was answered 503)
// is sent to no node. A node whose connections were not among the keys
// learns that only from history: it holds the next message for
// order_gap_wait, reads the gap (deliverEntry passes over an entry for
// other keys, and a void one, silently) and then delivers. That stall is
// once per such gap (what comes meanwhile goes out with it), bounded by
// order_gap_wait plus one History call (logicCallTimeout at worst), and
// for key pushes happens only to a user with connections on several
// nodes. Telling the node at once would take job sending a position-only
// notice to every node of the user for each key push (a registry read
// and a publish per node): README "The cost of that" says why not.

// Bounds on what the orderer holds. Held messages keep their encoded
// packet, shared by every recipient.
const (
	// maxHeldPerStream: a room at 80,000 pushes/s (what one logic now
	// accepts through batches or a gRPC stream; it was 5,000 when this was
	// 1,024) whose gap lasts the 200 ms order_gap_wait holds 16,000. Job
	// runs a bundle's pushes at once, so one can reach the node a
	// bundle or two behind its successors: at 1,024, 3,000 pushes to a
	// room over one stream overflowed and went out unordered
	// (TestGRPCPushAPI). At the bound the gap is fetched at once, and
	// what comes meanwhile goes out unordered (counted) rather than grow
	// the hold; the node's bounds below still cap the memory.
	maxHeldPerStream = 16_384
	// maxHeldPerNode and maxHeldBytes bound the whole node: 4 streams
	// held full, or 64 MiB of packets (push bodies are at most logic's
	// body limit), and maxHeldBytesPerStream keeps one stream with a gap
	// that does not close (16,384 packets of 4 KiB would be all 64 MiB)
	// from taking more than an eighth of it, so that the node's other
	// streams stay ordered. Past them a message is delivered unordered,
	// never dropped.
	maxHeldPerNode        = 65_536
	maxHeldBytes          = 64 << 20
	maxHeldBytesPerStream = maxHeldBytes / 8
	// maxSkippedKept: positions a room stream skipped (history could not
	// give them) are remembered, so that one arriving late from job is
	// still delivered, late, rather than taken for a duplicate. 1,024
	// positions of 8 bytes per room stream.
	maxSkippedKept = 1024
	// maxRetiredEpochs: messages of a stream's previous epochs still in
	// flight when it changed are dropped, not taken for yet another new
	// epoch (which would reset the stream back).
	maxRetiredEpochs = 4
	// maxStreamKeys bounds the keys a user stream remembers to find the
	// user's connections (logic.max_sessions_per_mid is smaller).
	maxStreamKeys = 64
	// fillLimit is the entries one gap fill asks for: logic's cap.
	fillLimit = 1000
	// maxFillTries: a gap fill logic did not answer is tried again after
	// another order_gap_wait, three times in all, before the gap is
	// skipped: one lost call (a logic restarting, a timeout under load)
	// no longer costs the stream its order and a late message its place.
	maxFillTries = 3
)

// orderer holds the node's streams.
type orderer struct {
	s    *Stage
	wait time.Duration

	mu      sync.Mutex
	streams map[string]*stream

	// held and heldBytes count what every stream holds.
	held, heldBytes atomic.Int64
	// off is set when logic said history is off: op 12 then does not
	// ask Tops for every room it joins.
	off atomic.Bool

	skipped   atomic.Int64 // positions history could not give, passed over
	filled    atomic.Int64 // messages delivered from history
	dups      atomic.Int64 // duplicates and stale epochs dropped
	late      atomic.Int64 // delivered after their successors (skipped, then came)
	unordered atomic.Int64 // delivered out of order over a bound
	resets    atomic.Int64 // epoch changes
	log       *pipeline.RateLog
}

func newOrderer(s *Stage, wait time.Duration) *orderer {
	if wait <= 0 {
		wait = 200 * time.Millisecond
	}
	return &orderer{s: s, wait: wait, streams: map[string]*stream{},
		log: pipeline.NewRateLog(s.logger, slog.LevelWarn, logEvery)}
}

// stream is one room's or user's order at this node.
type stream struct {
	o      *orderer
	name   string
	room   string // a room stream's room; "" for a user stream
	mid    int64  // a user stream's user
	isRoom bool

	mu      sync.Mutex
	gone    bool // dropped from the orderer: callers look it up again
	known   bool // epoch and last are set
	epoch   string
	last    uint64
	retired []string
	held    map[uint64]*heldMsg
	// heldBytes is what held's packets take (st.mu): one stream may hold
	// at most maxHeldBytesPerStream of the node's maxHeldBytes.
	heldBytes int64
	armed     bool // the gap timer is set
	filling   bool // a history call is in flight
	// fillFails counts the gap fills in a row logic did not answer; at
	// maxFillTries the gap is skipped.
	fillFails int
	timer     *time.Timer
	skipped   []uint64            // room streams: passed-over positions, oldest first
	keys      map[string]struct{} // user streams: keys seen, to find the user's connections
	marked    bool                // no client at the last sweep
}

// heldMsg is one message waiting for its predecessors.
type heldMsg struct {
	pos   uint64
	epoch string
	item  outItem
	chans []*channel // user streams: its recipients
	proto *pb.Proto  // user streams: the push, for its delivered events
}

// at is item at pos of stream: a connection that opted in gets it as op
// 20, with the packet every such recipient shares; the others get item's
// own bytes. One allocation per message and stream, none per connection.
func at(item outItem, stream, epoch string, pos uint64) outItem {
	item.sp = &streamItem{stream: stream, epoch: epoch, pos: pos}
	return item
}

// sink gathers a room stream's deliveries, fanned out once the stream's
// lock is released (in the order they were joined).
type sink struct{ items []outItem }

// posFor returns p's position in stream, or nil.
func posFor(p *pb.Proto, stream string) *pb.StreamPos {
	for _, sp := range p.Positions {
		if sp.GetStream() == stream {
			return sp
		}
	}
	return nil
}

func positioned(ps []*pb.Proto) bool {
	for _, p := range ps {
		if len(p.Positions) > 0 {
			return true
		}
	}
	return false
}

// get returns the stream, or nil.
func (o *orderer) get(name string) *stream {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.streams[name]
}

// getOrCreate returns the stream, created (with its top unknown, locked
// for the caller) if absent; created reports that it was.
func (o *orderer) getOrCreate(name string) (st *stream, created bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if st = o.streams[name]; st != nil {
		return st, false
	}
	st = &stream{o: o, name: name, held: map[uint64]*heldMsg{}}
	// Locked before anyone can see it: the message that creates it is
	// held before askTop can settle it.
	st.mu.Lock()
	if room, ok := pipeline.StreamRoom(name); ok {
		st.room, st.isRoom = room, true
	} else {
		st.mid, _ = pipeline.StreamMid(name)
		st.keys = map[string]struct{}{}
	}
	o.streams[name] = st
	return st, true
}

// lockStream returns the stream locked and not gone; a stream created
// with its top unknown asks logic for it (in the background) unless the
// caller has it.
func (o *orderer) lockStream(name string, ask bool) *stream {
	for {
		st, created := o.getOrCreate(name)
		if created {
			if ask {
				go o.askTop(st)
			}
			return st
		}
		st.mu.Lock()
		if !st.gone {
			return st
		}
		st.mu.Unlock()
	}
}

// start begins ordering the streams of a new connection at the tops
// logic gave in its ConnectReply; a stream the node already orders keeps
// its state.
func (o *orderer) start(ch *channel, rooms []string, tops []*pb.StreamPos) {
	if len(tops) > 0 {
		o.off.Store(false)
	}
	user := pipeline.UserStream(ch.mid)
	if top := findTop(tops, user); top != nil || o.get(user) != nil {
		st := o.lockStream(user, top == nil)
		st.addKey(ch.key)
		o.settle(st, top)
	}
	for _, r := range rooms {
		if top := findTop(tops, pipeline.RoomStream(r)); top != nil {
			o.settle(o.lockStream(pipeline.RoomStream(r), false), top)
		}
	}
}

// joinRoom makes sure the node orders room before a client joins it with
// op 12: a room the node does not host yet starts at logic's top.
func (o *orderer) joinRoom(room string) {
	name := pipeline.RoomStream(room)
	if o.off.Load() || o.get(name) != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
	defer cancel()
	r, err := o.s.logic.Tops(ctx, &pb.TopsReq{Streams: []string{name}})
	if err != nil {
		o.noteErr(err)
		// Its first positioned message asks again.
		return
	}
	top := findTop(r.Tops, name)
	o.settle(o.lockStream(name, top == nil), top)
}

// noteErr remembers that logic keeps no history.
func (o *orderer) noteErr(err error) {
	if c := status.Code(err); c == codes.FailedPrecondition || c == codes.Unimplemented {
		o.off.Store(true)
		return
	}
	o.log.Log("ask logic for stream positions", "err", err)
}

func findTop(tops []*pb.StreamPos, name string) *pb.StreamPos {
	for _, t := range tops {
		if t.GetStream() == name {
			return t
		}
	}
	return nil
}

// settle sets a locked stream's top if it is unknown, delivers what that
// releases and unlocks it. A stream is marked live: a client just came.
func (o *orderer) settle(st *stream, top *pb.StreamPos) {
	var sk sink
	st.marked = false
	if top != nil && !st.known {
		st.resolve(top, &sk)
	}
	run := st.flush(&sk)
	st.mu.Unlock()
	if run != nil {
		run()
	}
}

// askTop learns a stream's top from logic when a positioned message came
// before the node knew it. Without an answer the stream starts at its
// first held message: order holds from there.
func (o *orderer) askTop(st *stream) {
	ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
	r, err := o.s.logic.Tops(ctx, &pb.TopsReq{Streams: []string{st.name}})
	cancel()
	var top *pb.StreamPos
	if err != nil {
		o.noteErr(err)
	} else {
		top = findTop(r.Tops, st.name)
	}
	st.mu.Lock()
	if st.gone || st.known {
		st.mu.Unlock()
		return
	}
	if top == nil {
		if h := st.minHeld(); h != nil {
			top = &pb.StreamPos{Stream: st.name, Epoch: h.epoch, Pos: h.pos - 1}
		} else {
			top = &pb.StreamPos{Stream: st.name}
		}
	}
	o.settle(st, top)
}

// roomPush delivers a room push's items (one per proto of ps) in stream
// order and returns the members reached. Called only when some proto has
// a position.
func (o *orderer) roomPush(room string, items []outItem, ps []*pb.Proto) int {
	name := pipeline.RoomStream(room)
	if o.get(name) == nil && !o.s.roomHosted(room) {
		// No member here: nothing to order, nothing to remember.
		items = o.s.firstDeliveries(items, ps)
		if len(items) == 0 {
			return 0
		}
		return o.s.rounds.send(room, items, func(items []outItem) int { return o.s.fanout(room, items) })
	}
	st := o.lockStream(name, true)
	var sk sink
	for i, it := range items {
		// Marked delivered under the stream's lock: a gap fill marks and
		// delivers the same id under it (deliverEntry), so exactly one of
		// the two sends it. Marked before the lock, job's copy could be
		// marked, then lose the lock to a fill that took the id for
		// delivered and moved past it: the message was sent by neither
		// (TestOrderUnderJobLikeDelivery, 1 run in 10).
		if !o.s.firstDelivery(ps[i]) {
			continue
		}
		sp := posFor(ps[i], name)
		if sp == nil {
			sk.items = append(sk.items, it)
			continue
		}
		st.offer(&heldMsg{pos: sp.Pos, epoch: sp.Epoch, item: at(it, name, sp.Epoch, sp.Pos)}, ps[i].GetId() != "", &sk)
	}
	run := st.flush(&sk)
	st.mu.Unlock()
	if run == nil {
		return 0
	}
	return run()
}

// pushKeys is PushMsg for a positioned message: each key's connection gets
// it in the order of its user's stream. A message held for its
// predecessors counts as delivered: it goes out once they have, or once
// the gap is given up.
func (o *orderer) pushKeys(req *pb.PushMsgReq, item outItem) *pb.PushMsgReply {
	reply := &pb.PushMsgReply{}
	id := req.Proto.GetId()
	type group struct {
		sp    *pb.StreamPos
		name  string
		chans []*channel
	}
	var groups []group
	// The pair is keyed by the push's id as history keeps it, so that an
	// entry a gap fill delivered (deliverEntry) is not delivered again
	// when job's copy of it comes late. Job's copy is named
	// "<msg_id>/<node>" (one message per node holding the user's keys),
	// history's entry "<msg_id>": keyed by the full name, a copy job
	// retried to a key that moved here from a killed node went out twice
	// (TestIntegrationKillCloudRecover, 1 in ~5,000 user pushes).
	pairID := historyID(id)
	for _, key := range req.Keys {
		ch := bucketFor(o.s.buckets, key).get(key)
		if ch != nil && ch.accepts(item.op) && !ch.isClosed() {
			if name := pipeline.UserStream(ch.mid); posFor(req.Proto, name) != nil {
				// Counted delivered: it is, was, or is held to be. The
				// pair is marked under the stream's lock, below.
				reply.Delivered++
				i := slices.IndexFunc(groups, func(g group) bool { return g.name == name })
				if i < 0 {
					groups = append(groups, group{sp: posFor(req.Proto, name), name: name})
					i = len(groups) - 1
				}
				groups[i].chans = append(groups[i].chans, ch)
				continue
			}
		}
		if id != "" && !o.s.delivered.AddPairIfAbsent(pairID, key) {
			reply.Delivered++ // by an earlier call with this id
			continue
		}
		switch {
		case ch != nil && !ch.accepts(item.op):
			// Not subscribed: dropped by the client's choice, as PushMsg.
		case ch != nil && !ch.isClosed() && ch.push(o.s.deliveredItem(item, ch, req.Proto)):
			reply.Delivered++
		default:
			o.s.offline(reply, pairID, key)
		}
	}
	for _, g := range groups {
		st := o.lockStream(g.name, true)
		chans := g.chans[:0]
		for _, ch := range g.chans {
			st.addKey(ch.key)
			// Under the stream's lock, as roomPush marks a room's.
			if id == "" || o.s.delivered.AddPairIfAbsent(pairID, ch.key) {
				chans = append(chans, ch)
			}
		}
		if len(chans) > 0 {
			st.offer(&heldMsg{pos: g.sp.Pos, epoch: g.sp.Epoch, item: at(item, g.name, g.sp.Epoch, g.sp.Pos), chans: chans, proto: req.Proto}, id != "", nil)
		}
		st.mu.Unlock()
	}
	return reply
}

// historyID is the id history keeps for a user push job delivers as id:
// logic names a key or mid push's per-node messages "<msg_id>/<node>" and
// keeps "<msg_id>" in history. An id without a node is its own.
func historyID(id string) string {
	if i := strings.LastIndexByte(id, '/'); i >= 0 {
		return id[:i]
	}
	return id
}

// sweep forgets the streams no client of the node has been in for a whole
// sweep period (cloud.renew_interval): what they held is for nobody.
func (o *orderer) sweep() {
	o.mu.Lock()
	all := make([]*stream, 0, len(o.streams))
	for _, st := range o.streams {
		all = append(all, st)
	}
	o.mu.Unlock()
	for _, st := range all {
		live := false
		if st.isRoom {
			live = o.s.roomHosted(st.room)
		}
		st.mu.Lock()
		if !st.isRoom {
			live = len(st.liveChans()) > 0
		}
		switch {
		case live:
			st.marked = false
		case !st.marked:
			st.marked = true
		default:
			st.gone = true
			if st.timer != nil {
				st.timer.Stop()
			}
			for pos, h := range st.held {
				o.release(st, h)
				delete(st.held, pos)
			}
			o.mu.Lock()
			if o.streams[st.name] == st {
				delete(o.streams, st.name)
			}
			o.mu.Unlock()
		}
		st.mu.Unlock()
	}
}

// streamCount is the number of streams ordered.
func (o *orderer) streamCount() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.streams)
}

func (o *orderer) release(st *stream, h *heldMsg) {
	o.held.Add(-1)
	o.heldBytes.Add(-int64(len(h.item.pkt)))
	st.heldBytes -= int64(len(h.item.pkt))
}

// Everything below runs with st.mu held.

func (st *stream) addKey(key string) {
	if st.keys != nil && len(st.keys) < maxStreamKeys {
		st.keys[key] = struct{}{}
	}
}

// liveChans returns the user's connections on the node among the keys
// seen, forgetting keys that are gone.
func (st *stream) liveChans() []*channel {
	var chs []*channel
	for key := range st.keys {
		ch := bucketFor(st.o.s.buckets, key).get(key)
		if ch == nil || ch.mid != st.mid {
			delete(st.keys, key)
			continue
		}
		chs = append(chs, ch)
	}
	return chs
}

// offer takes one message at its position.
func (st *stream) offer(m *heldMsg, hasID bool, sk *sink) {
	o := st.o
	if !st.known {
		st.hold(m, sk)
		return
	}
	if m.epoch != st.epoch {
		if slices.Contains(st.retired, m.epoch) {
			o.dups.Add(1)
			return
		}
		st.newEpoch(m.epoch, m.pos, sk)
	}
	switch {
	case m.pos <= st.last:
		if st.lateOK(m.pos, hasID) {
			o.late.Add(1)
			st.deliver(m, sk)
			return
		}
		o.dups.Add(1)
	case m.pos == st.last+1:
		st.deliver(m, sk)
		st.last = m.pos
		st.drain(sk)
	default:
		st.hold(m, sk)
	}
}

// lateOK reports whether a message at or below last is still delivered.
// A room's is when its position was skipped (history could not give it):
// late beats lost. A user's is when it has an id: PushMsg already dropped
// the keys that got this id, so the keys left did not get it — a key that
// reconnected here while job retried it, or a skipped one.
func (st *stream) lateOK(pos uint64, hasID bool) bool {
	if !st.isRoom {
		return hasID
	}
	i := slices.Index(st.skipped, pos)
	if i < 0 {
		return false
	}
	st.skipped = slices.Delete(st.skipped, i, i+1)
	return true
}

// hold keeps m until its predecessors are delivered. Over a bound it is
// delivered now, unordered, and the gap is fetched at once.
func (st *stream) hold(m *heldMsg, sk *sink) {
	o := st.o
	if h := st.held[m.pos]; h != nil {
		if h.epoch != m.epoch || st.isRoom {
			o.dups.Add(1)
			return
		}
		// Another call for the same user message: more of its keys.
		for _, ch := range m.chans {
			if !slices.Contains(h.chans, ch) {
				h.chans = append(h.chans, ch)
			}
		}
		return
	}
	size := int64(len(m.item.pkt))
	if len(st.held) >= maxHeldPerStream || st.heldBytes+size > maxHeldBytesPerStream ||
		o.held.Load() >= maxHeldPerNode || o.heldBytes.Load()+size > maxHeldBytes {
		n := o.unordered.Add(1)
		o.log.Log("stream holds too much; delivering out of order", "stream", st.name, "held", len(st.held), "node_held", o.held.Load(), "unordered", n)
		st.deliver(m, sk)
		if st.known {
			st.arm(0)
		}
		return
	}
	st.held[m.pos] = m
	st.heldBytes += size
	o.held.Add(1)
	o.heldBytes.Add(size)
	if st.known {
		st.arm(o.wait)
	}
}

// arm sets the gap timer unless it is set or a fill is running; d 0
// (a bound reached) brings a set timer forward.
func (st *stream) arm(d time.Duration) {
	if st.filling {
		return
	}
	if st.armed {
		if d == 0 {
			st.timer.Reset(0)
		}
		return
	}
	st.armed = true
	if st.timer == nil {
		st.timer = time.AfterFunc(d, st.fill)
		return
	}
	st.timer.Reset(d)
}

// drain delivers the held messages that follow last.
func (st *stream) drain(sk *sink) {
	for {
		h := st.held[st.last+1]
		if h == nil {
			break
		}
		delete(st.held, h.pos)
		st.o.release(st, h)
		st.deliver(h, sk)
		st.last = h.pos
	}
	if len(st.held) == 0 && st.armed {
		st.timer.Stop()
		st.armed = false
	}
}

// deliver sends m to the stream's clients.
func (st *stream) deliver(m *heldMsg, sk *sink) {
	if st.isRoom {
		sk.items = append(sk.items, m.item)
		return
	}
	for _, ch := range m.chans {
		ch.push(st.o.s.deliveredItem(m.item, ch, m.proto))
	}
}

// maxHeldPos is the highest position held (0: none).
func (st *stream) maxHeldPos() uint64 {
	var high uint64
	for pos := range st.held {
		high = max(high, pos)
	}
	return high
}

// minHeld is the held message of the lowest position.
func (st *stream) minHeld() *heldMsg {
	var low *heldMsg
	for _, h := range st.held {
		if low == nil || h.pos < low.pos {
			low = h
		}
	}
	return low
}

// takeHeld removes and returns every held message, lowest first.
func (st *stream) takeHeld() []*heldMsg {
	hs := make([]*heldMsg, 0, len(st.held))
	for pos, h := range st.held {
		hs = append(hs, h)
		st.o.release(st, h)
		delete(st.held, pos)
	}
	slices.SortFunc(hs, func(a, b *heldMsg) int {
		switch {
		case a.pos < b.pos:
			return -1
		case a.pos > b.pos:
			return 1
		}
		return 0
	})
	return hs
}

// resolve sets a stream's top once it is known. What was held meanwhile
// came to this node's clients, and the top, read after it came, may
// already be past messages still in flight to it: the stream starts
// before the lowest held message of the top's epoch, if that is lower.
func (st *stream) resolve(top *pb.StreamPos, sk *sink) {
	st.known, st.epoch, st.last = true, top.Epoch, top.Pos
	for _, h := range st.held {
		if h.epoch == top.Epoch && h.pos <= st.last {
			st.last = h.pos - 1
		}
	}
	for _, h := range st.takeHeld() {
		if h.epoch != st.epoch || h.pos <= st.last {
			st.deliver(h, sk)
			continue
		}
		st.offer(h, false, sk)
	}
}

// newEpoch restarts the stream in epoch at pos: its history was lost, so
// its old positions mean nothing. What the old epoch held goes out first,
// in order.
func (st *stream) newEpoch(epoch string, pos uint64, sk *sink) {
	o := st.o
	n := o.resets.Add(1)
	o.log.Log("stream epoch changed; ordering from the new epoch's message", "stream", st.name, "from", st.epoch, "to", epoch, "pos", pos, "resets", n)
	for _, h := range st.takeHeld() {
		st.deliver(h, sk)
	}
	if st.armed {
		st.timer.Stop()
		st.armed = false
	}
	if st.epoch != "" {
		st.retired = append(st.retired, st.epoch)
		if len(st.retired) > maxRetiredEpochs {
			st.retired = st.retired[1:]
		}
	}
	st.epoch, st.last, st.skipped = epoch, pos-1, nil
}

// skipTo passes over the positions after last up to pos: history cannot
// give them.
func (st *stream) skipTo(pos uint64) {
	if pos <= st.last {
		return
	}
	n := pos - st.last
	if st.isRoom {
		from := max(st.last+1, pos-min(n, maxSkippedKept)+1)
		for p := from; p <= pos; p++ {
			st.skipped = append(st.skipped, p)
		}
		if over := len(st.skipped) - maxSkippedKept; over > 0 {
			st.skipped = slices.Delete(st.skipped, 0, over)
		}
	}
	total := st.o.skipped.Add(int64(n))
	st.o.log.Log("stream positions skipped: history does not have them (order needs history; a late one is delivered late)",
		"stream", st.name, "epoch", st.epoch, "after", st.last, "through", pos, "skipped_total", total)
	st.last = pos
}

// flush hands a room stream's gathered deliveries to the room's fan-out,
// in order; the caller runs the result after unlocking.
func (st *stream) flush(sk *sink) func() int {
	if !st.isRoom || len(sk.items) == 0 {
		return nil
	}
	room, s := st.room, st.o.s
	return s.rounds.join(room, sk.items, func(items []outItem) int { return s.fanout(room, items) })
}

// fill fetches a stream's gap from logic's history when the gap timer
// fires, delivers what it gets in order and skips what it cannot get.
func (st *stream) fill() {
	o := st.o
	for {
		st.mu.Lock()
		st.armed = false
		low := st.minHeld()
		if st.gone || !st.known || st.filling || low == nil {
			st.mu.Unlock()
			return
		}
		after, through, epoch := st.last, low.pos-1, st.epoch
		// What is held now came before the read: history's top will be
		// at or past it. What comes during the read may be past that top.
		held := st.maxHeldPos()
		st.filling = true
		st.mu.Unlock()

		entries, top, unrec, err := o.fetch(st.name, epoch, after, through)

		st.mu.Lock()
		st.filling = false
		if st.gone || st.epoch != epoch {
			st.mu.Unlock()
			return
		}
		var sk sink
		more := st.applyFill(through, held, entries, top, unrec, err, &sk)
		if !more && len(st.held) > 0 {
			st.arm(o.wait)
		}
		run := st.flush(&sk)
		st.mu.Unlock()
		if run != nil {
			run()
		}
		if !more {
			return
		}
	}
}

// fetch asks logic for a stream's entries after after, through through at
// most. A trimmed answer is asked again from the oldest kept: those after
// the trimmed ones still fill part of the gap.
func (o *orderer) fetch(name, epoch string, after, through uint64) ([]*pb.HistoryEntry, *pb.StreamPos, string, error) {
	limit := int32(min(through-after, fillLimit))
	ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
	defer cancel()
	r, err := o.s.logic.History(ctx, &pb.HistoryReq{Stream: name, Epoch: epoch, After: after, Limit: limit})
	if err != nil {
		return nil, nil, "", err
	}
	if r.Unrecoverable == wire.ReasonTrimmed {
		// "Everything kept" is epoch "" with after 0 (pipeline.History.
		// Since): a position in the epoch is exact, so (epoch, 0) is
		// itself trimmed once position 1 is gone. The oldest kept are
		// then of whatever epoch the stream has now: another one means
		// this epoch's history is lost.
		again, err := o.s.logic.History(ctx, &pb.HistoryReq{Stream: name, Limit: limit})
		if err == nil && again.Unrecoverable == "" {
			if again.GetTop().GetEpoch() != epoch {
				return nil, again.Top, wire.ReasonEpoch, nil
			}
			return again.Entries, again.Top, wire.ReasonTrimmed, nil
		}
	}
	return r.Entries, r.Top, r.Unrecoverable, nil
}

// applyFill delivers a fill's entries and skips what it lacks; more says
// a full page came and the rest of the gap is to be asked at once. held
// is the highest position held when the read began.
func (st *stream) applyFill(through, held uint64, entries []*pb.HistoryEntry, top *pb.StreamPos, unrec string, err error, sk *sink) (more bool) {
	o := st.o
	if err != nil {
		o.noteErr(err)
		if st.fillFails++; st.fillFails < maxFillTries && !o.off.Load() {
			// Logic did not answer: the gap is still fillable. The
			// caller arms the timer again; the hold bounds what waits.
			return false
		}
	}
	st.fillFails = 0
	for _, e := range entries {
		if e.Pos <= st.last {
			continue
		}
		if e.Pos > through {
			break
		}
		st.skipTo(e.Pos - 1)
		if st.held[e.Pos] == nil {
			st.deliverEntry(e, sk)
			st.last = e.Pos
		}
		st.drain(sk)
	}
	if err == nil && unrec == "" && len(entries) == fillLimit && st.last < through {
		return true
	}
	// A position held before the read and past the top it read was never
	// given by logic: delivered, but the stream does not move to it. One
	// that came during the read may be past that top and genuine: it
	// waits as any other (ordered out of order when the top read was
	// taken as final: TestOrderUnderJobLikeDelivery).
	if top != nil && top.Epoch == st.epoch {
		for pos, h := range st.held {
			if pos > top.Pos && pos <= held {
				delete(st.held, pos)
				o.release(st, h)
				o.unordered.Add(1)
				st.deliver(h, sk)
			}
		}
	}
	if unrec == "epoch" {
		// The history of this epoch is gone; the next message of the new
		// one restarts the stream. What is held goes out in order.
		for _, h := range st.takeHeld() {
			st.deliver(h, sk)
			st.last = max(st.last, h.pos)
		}
		return false
	}
	if low := st.minHeld(); low != nil && low.pos-1 > st.last && low.pos-1 <= through {
		st.skipTo(low.pos - 1)
		st.drain(sk)
	}
	return false
}

// deliverEntry sends a history entry to the stream's clients, as job
// would have: each id once per room, once per key.
func (st *stream) deliverEntry(e *pb.HistoryEntry, sk *sink) {
	o := st.o
	if e.Void {
		// The position was given but its message never accepted: there
		// is nothing to deliver, and nothing was lost. Filled, silently.
		o.filled.Add(1)
		return
	}
	if e.Op < wire.MinBusinessOp {
		o.skipped.Add(1)
		return
	}
	o.filled.Add(1)
	item := at(outItem{pkt: wire.Encode(e.Op, 0, e.Body), op: e.Op, push: true}, st.name, st.epoch, e.Pos)
	if st.isRoom {
		if e.Id == "" || o.s.delivered.AddIfAbsent(e.Id) {
			sk.items = append(sk.items, item)
		}
		return
	}
	// A mid push goes to each of the user's connections here, as
	// recovery gives it to any of them; a key push only to its keys'
	// connections (a message for device A never reaches device C).
	p := &pb.Proto{Id: e.Id, Op: e.Op, Positions: []*pb.StreamPos{{Stream: st.name, Epoch: st.epoch, Pos: e.Pos}}}
	for _, ch := range st.liveChans() {
		if !entryFor(e, ch.key) {
			continue
		}
		if e.Id == "" || o.s.delivered.AddPairIfAbsent(e.Id, ch.key) {
			ch.push(o.s.deliveredItem(item, ch, p))
		}
	}
}

// entryFor reports whether a user stream's entry is for the connection of
// key: a key push (keys set) only for its keys, any other for all.
func entryFor(e *pb.HistoryEntry, key string) bool {
	return len(e.Keys) == 0 || slices.Contains(e.Keys, key)
}
