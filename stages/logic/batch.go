package logic

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/google/uuid"
	"github.com/tidwall/gjson"
)

// BatchNDJSONType is the media type of a batch sent as newline-delimited
// JSON, one push object a line; application/json sends a JSON array.
const BatchNDJSONType = "application/x-ndjson"

// batchFields are the members of a batch item: a push's parameters, with
// its route named by which of keys, mids, room and all it holds, and its
// own idempotency key and correlation id. An item's members are marked
// seen by their index, in a bit set rather than a map made per item (a
// map and its entries were 4 % of a batch's CPU, pprof).
var batchFields = [...]string{"operation", "keys", "mids", "type", "room", "all", "speed", "msg", "idempotency_key", "request_id"}

// batchField is f's index in batchFields, or -1.
func batchField(f string) int {
	for i, name := range batchFields {
		if name == f {
			return i
		}
	}
	return -1
}

// fieldSet is a set of batchFields, by index.
type fieldSet uint16

func (s fieldSet) has(f string) bool { i := batchField(f); return i >= 0 && s&(1<<i) != 0 }

// batchRoutes name an item's route by the member that holds its targets.
var batchRoutes = []struct{ field, name string }{
	{"keys", "push/keys"}, {"mids", "push/mids"}, {"room", "push/room"}, {"all", "push/all"},
}

// pushBatch is POST /im/push/batch: many pushes in one request, each
// validated, deduplicated and answered on its own, published to the broker
// in one call. Only a request that cannot be read as a list of objects
// (or is over a size limit) fails whole, and then publishes nothing.
func (st *Stage) pushBatch(w http.ResponseWriter, r *http.Request) {
	fail := func(code int, err error) {
		if st.metrics != nil {
			st.metrics.Push("batch", code)
		}
		writeError(w, code, err.Error())
	}
	corr, err := headerValue(r, "X-Request-ID", maxRequestIDBytes)
	if err != nil {
		fail(http.StatusBadRequest, err)
		return
	}
	if len(r.Header.Values("Idempotency-Key")) > 0 {
		fail(http.StatusBadRequest, badParam("Idempotency-Key", "not taken by a batch: give each item its idempotency_key"))
		return
	}
	items, err := readBatch(r, st.cfg.MaxBatchItems, st.cfg.MaxBatchBytes)
	var tooLarge *tooLargeError
	if errors.As(err, &tooLarge) {
		fail(http.StatusRequestEntityTooLarge, err)
		return
	}
	if err != nil {
		fail(http.StatusBadRequest, err)
		return
	}
	if corr == "" {
		corr = uuid.NewString()
	}
	out := st.acceptEach(r.Context(), len(items), func(i int) (pushRequest, error) { return st.batchItem(items[i], corr, i) })
	retry := false
	for _, o := range out {
		retry = retry || o.retryable()
	}
	if retry {
		w.Header().Set("Retry-After", "1")
	}
	writeBatch(w, out)
}

// readBatch reads a batch's items: a JSON array, or newline-delimited
// JSON (BatchNDJSONType; a body without a Content-Type is read as an
// array if it starts with '['). Each item is one JSON value, checked as a
// push on its own; what does not parse as JSON at all fails the request.
func readBatch(r *http.Request, maxItems, maxBytes int) ([]json.RawMessage, error) {
	vs := r.Header.Values("Content-Type")
	if len(vs) > 1 {
		return nil, badParam("Content-Type", "given %d times, want once", len(vs))
	}
	mt := ""
	if len(vs) == 1 && strings.TrimSpace(vs[0]) != "" {
		var err error
		if mt, _, err = mime.ParseMediaType(vs[0]); err != nil {
			return nil, badParam("Content-Type", "%s does not parse: %v", echo(vs[0]), err)
		}
		if mt != "application/json" && mt != BatchNDJSONType {
			return nil, badParam("Content-Type", "%s: want application/json (an array of pushes) or %s (one push a line)", echo(mt), BatchNDJSONType)
		}
	}
	body, err := readBody(r, int64(maxBytes))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return nil, &tooLargeError{fmt.Sprintf("body: larger than %d bytes (logic.max_batch_bytes)", maxBytes)}
	}
	if err != nil {
		return nil, badParam("body", "read: %v", err)
	}
	if mt == "" {
		mt = BatchNDJSONType
		if t := bytes.TrimLeft(body, " \t\r\n"); len(t) > 0 && t[0] == '[' {
			mt = "application/json"
		}
	}
	tooMany := &tooLargeError{fmt.Sprintf("body: more than %d pushes (logic.max_batch_items)", maxItems)}
	var items []json.RawMessage
	if mt == BatchNDJSONType {
		// Line by line, not bytes.Split: a body of 4 MiB of newlines
		// made Split allocate 96 MiB of slice headers.
		for n, rest := 1, body; len(rest) > 0; n++ {
			line := rest
			if i := bytes.IndexByte(rest, '\n'); i >= 0 {
				line, rest = rest[:i], rest[i+1:]
			} else {
				rest = nil
			}
			line = bytes.TrimSpace(line)
			if len(line) == 0 {
				continue
			}
			if !json.Valid(line) {
				return nil, badParam("body", "line %d is not JSON", n)
			}
			if len(items) == maxItems {
				return nil, tooMany
			}
			items = append(items, line)
		}
	} else {
		notArray := badParam("body", "want a JSON array of pushes")
		dec := json.NewDecoder(bytes.NewReader(body))
		if tok, err := dec.Token(); err != nil || tok != json.Delim('[') {
			return nil, notArray
		}
		for dec.More() {
			var raw json.RawMessage
			if err := dec.Decode(&raw); err != nil {
				return nil, badParam("body", "item %d is not JSON", len(items))
			}
			if len(items) == maxItems {
				return nil, tooMany
			}
			items = append(items, raw)
		}
		if tok, err := dec.Token(); err != nil || tok != json.Delim(']') {
			return nil, notArray
		}
		if _, err := dec.Token(); err != io.EOF {
			return nil, badParam("body", "want one JSON array, found more after it")
		}
	}
	if len(items) == 0 {
		return nil, badParam("body", "no pushes")
	}
	return items, nil
}

// batchItem validates item i of a batch into a push request. Its name is
// set as soon as its route is known, for metrics. The item was checked to
// be JSON when the batch was read; its members are walked with gjson,
// which hands each value's bytes as they were sent (a msg that is not a
// string is published byte for byte) without building a tree: with
// encoding/json's Decoder and a map of raw members, parsing was 22 % of a
// batch's CPU (pprof, batches of 100 at 84k pushes/s).
func (st *Stage) batchItem(raw json.RawMessage, corr string, i int) (pushRequest, error) {
	if max := jsonBodyLimit(st.cfg.MaxMessageBytes); int64(len(raw)) > max {
		// As a single push's JSON body: one item does not carry more
		// targets than a single push may.
		return pushRequest{}, &tooLargeError{fmt.Sprintf("item: %d bytes, at most %d (a message of logic.max_message_bytes with its targets)", len(raw), max)}
	}
	item := gjson.ParseBytes(raw)
	if !item.IsObject() {
		return pushRequest{}, badParam("item", "want a JSON object")
	}
	v := make(url.Values, 4)
	var (
		msg, all gjson.Result // not pointers to ForEach's values: each would be moved to the heap
		hasMsg   bool
		seen     fieldSet
		err      error
	)
	item.ForEach(func(key, value gjson.Result) bool {
		f := key.Str
		i := batchField(f)
		switch {
		case i < 0:
			err = badParam(truncate(f), "unknown field")
		case seen&(1<<i) != 0:
			err = badParam(truncate(f), "given twice in the JSON body, want once")
		case f == "msg":
			msg, hasMsg = value, true
		case f == "all":
			all = value
		default:
			err = jsonValues(v, f, value)
		}
		if i >= 0 {
			seen |= 1 << i
		}
		return err == nil
	})
	if err != nil {
		return pushRequest{}, err
	}
	name := ""
	for _, r := range batchRoutes {
		if !seen.has(r.field) {
			continue
		}
		if name != "" {
			return pushRequest{}, badParam(r.field, "a push names one of keys, mids, room and all; this one also names %s", strings.TrimPrefix(name, "push/"))
		}
		name = r.name
	}
	req := pushRequest{name: name}
	switch {
	case name == "":
		return req, badParam("item", "names none of keys, mids, room and all")
	case seen.has("type") && name != "push/room":
		return req, badParam("type", "only with room")
	case seen.has("speed") && name != "push/all":
		return req, badParam("speed", "only with all")
	case seen.has("all") && all.Type != gjson.True:
		return req, badParam("all", "want true")
	case !hasMsg:
		return req, badParam("msg", "required in a JSON body")
	}
	p := &params{values: v}
	if msg.Type == gjson.String {
		p.msg = []byte(msg.Str)
	} else {
		p.msg = []byte(strings.TrimSpace(msg.Raw))
	}
	if len(p.msg) > st.cfg.MaxMessageBytes {
		return req, &tooLargeError{fmt.Sprintf("msg: larger than %d bytes", st.cfg.MaxMessageBytes)}
	}
	op, err := p.operation()
	if err != nil {
		return req, err
	}
	t, err := st.pushes[name](apiIM, p)
	if err != nil {
		return req, err
	}
	idemKey := v.Get("idempotency_key")
	if idemKey != "" {
		if err := checkText("idempotency_key", idemKey, MaxIdempotencyKeyBytes); err != nil {
			return req, err
		}
	}
	itemCorr := v.Get("request_id")
	if itemCorr != "" {
		if err := checkText("request_id", itemCorr, maxRequestIDBytes); err != nil {
			return req, err
		}
	} else {
		itemCorr = corr + "/" + strconv.Itoa(i)
	}
	return newRequest(name, idemKey, itemCorr, op, p.msg, t), nil
}

// jsonValues adds a JSON member to v as the query string would give it: a
// string or number as its text; for a list field (keys, mids, rooms) also
// a list of them, one value each.
func jsonValues(v url.Values, field string, value gjson.Result) error {
	scalar := func(r gjson.Result) (string, bool) {
		switch r.Type {
		case gjson.String:
			return r.Str, true
		case gjson.Number:
			return r.Raw, true
		}
		return "", false
	}
	if s, ok := scalar(value); ok {
		v.Add(field, s)
		return nil
	}
	if !listFields[field] || !value.IsArray() {
		if listFields[field] {
			return badParam(field, "want a string or number, or a list of them")
		}
		return badParam(field, "want a string or number")
	}
	var err error
	value.ForEach(func(_, e gjson.Result) bool {
		s, ok := scalar(e)
		if !ok {
			err = badParam(field, "want a string or number, or a list of them")
			return false
		}
		v.Add(field, s)
		return true
	})
	return err
}

// writeBatch answers a batch: 200 with one result per push, in order,
// each with its index and status, and a success's PushResult members or a
// failure's error. The counts let a caller see at a glance whether to
// look further.
func writeBatch(w http.ResponseWriter, out []outcome) {
	// Sized for what it will hold (a room push's result is ~150 bytes):
	// growing it was 1.5 % of a batch's CPU.
	size, ok := 96, 0
	for i := range out {
		if out[i].status == http.StatusOK {
			ok++
		}
		size += 48 + len(out[i].body()) + 2*len(out[i].err)
	}
	buf := make([]byte, 0, size)
	buf = append(buf, `{"code":0,"message":"ok","data":{"accepted":`...)
	buf = strconv.AppendInt(buf, int64(ok), 10)
	buf = append(buf, `,"failed":`...)
	buf = strconv.AppendInt(buf, int64(len(out)-ok), 10)
	buf = append(buf, `,"results":[`...)
	for i := range out {
		o := &out[i] // its body was encoded above, when sizing buf
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, `{"index":`...)
		buf = strconv.AppendInt(buf, int64(i), 10)
		buf = append(buf, `,"status":`...)
		buf = strconv.AppendInt(buf, int64(o.status), 10)
		switch {
		case o.status != http.StatusOK:
			msg, _ := json.Marshal(o.err)
			buf = append(buf, `,"error":`...)
			buf = append(buf, msg...)
			buf = append(buf, '}')
		default:
			if o.replayed {
				buf = append(buf, `,"replayed":true`...)
			}
			// data is a PushResult's JSON object (made here, or kept by
			// the idempotency store): its members join the result's.
			if d := bytes.TrimSpace(o.body()); len(d) > 2 && d[0] == '{' {
				buf = append(buf, ',')
				buf = append(buf, d[1:]...)
			} else {
				buf = append(buf, '}')
			}
		}
	}
	buf = append(buf, "]}}\n"...)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(buf)
}
