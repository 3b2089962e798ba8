package cloud

import (
	"strings"

	"imcloud/pipeline"
	"imcloud/pipeline/events"
	"imcloud/proto/pb"
)

// The events a cloud node emits (pipeline/events): connect once a client
// is in its bucket and rooms, disconnect when that connection ends (with
// the close code and reason the node sent), delivered when a key or mid
// push was written to a connection's socket. Emitting never blocks: a
// full emitter drops the event.

// emitConnect reports a connection that took its key.
func (s *Stage) emitConnect(ch *channel) {
	ch.mu.Lock()
	ch.announced = true
	ch.mu.Unlock()
	if !s.events.Enabled(events.Connect) {
		return
	}
	s.events.Emit(events.Event{Kind: events.Connect, Node: s.nodeID, Mid: ch.mid, Key: ch.key, Rooms: ch.roomList()})
}

// emitDisconnect reports the end of a connection that emitted connect
// (one replaced during its handshake never did).
func (s *Stage) emitDisconnect(ch *channel) {
	if !s.events.Enabled(events.Disconnect) {
		return
	}
	ch.mu.Lock()
	announced, code, reason := ch.announced, ch.closeCode, ch.closeReason
	rooms := append([]string(nil), ch.rooms...)
	ch.mu.Unlock()
	if !announced {
		return
	}
	s.events.Emit(events.Event{Kind: events.Disconnect, Node: s.nodeID, Mid: ch.mid, Key: ch.key, Rooms: rooms, Code: code, Reason: reason})
}

// deliveredItem is item for ch, reporting "delivered" once the channel's
// writer has written it to the socket; item itself when the kind is off.
// The packet bytes stay shared: only the 40-byte item is copied.
func (s *Stage) deliveredItem(item outItem, ch *channel, p *pb.Proto) outItem {
	ch.noteUserProto(p) // what an op 23 may acknowledge
	if !s.events.Enabled(events.Delivered) {
		return item
	}
	ev := events.Event{Kind: events.Delivered, Node: s.nodeID, Mid: ch.mid, Key: ch.key, MsgID: pushID(p.GetId()), Op: p.GetOp()}
	stream := pipeline.UserStream(ch.mid)
	for _, sp := range p.GetPositions() {
		if sp.GetStream() == stream {
			ev.Position = &events.Position{Stream: sp.Stream, Epoch: sp.Epoch, Pos: sp.Pos}
			break
		}
	}
	em := s.events
	item.written = func() { em.Emit(ev) }
	return item
}

// pushID is the push API's msg_id of a broker message id: logic names a
// key or mid push's per-node messages "<msg_id>/<node>".
func pushID(id string) string {
	msgID, _, _ := strings.Cut(id, "/")
	return msgID
}

// notifyWritten tells the items that asked that they went out.
func notifyWritten(items []outItem) {
	for _, it := range items {
		if it.written != nil {
			it.written()
		}
	}
}

// The acked event is emitted by the acker (ack.go) once logic took a
// user's ack: s.events.Acked(node, mid, key, position).
