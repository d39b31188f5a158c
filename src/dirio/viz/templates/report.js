(function () {
  "use strict";
  function sortKey(cell, numeric) {
    var raw = cell ? cell.getAttribute("data-value") : null;
    if (raw === null || raw === "") { return null; }
    if (!numeric) { return raw; }
    var value = Number(raw);
    return isFinite(value) ? value : null;
  }
  function sortTable(table, column, descending) {
    var header = table.tHead.rows[0].cells;
    var numeric = header[column].getAttribute("data-type") === "number";
    var body = table.tBodies[0];
    var items = Array.prototype.map.call(body.rows, function (row, index) {
      return { row: row, key: sortKey(row.cells[column], numeric), index: index };
    });
    items.sort(function (a, b) {
      if (a.key === null || b.key === null) {
        return a.key === b.key ? a.index - b.index : (a.key === null ? 1 : -1);
      }
      var order = numeric ? (a.key < b.key ? -1 : (a.key > b.key ? 1 : 0))
                          : a.key.localeCompare(b.key, undefined, { numeric: true });
      return (descending ? -order : order) || a.index - b.index;
    });
    items.forEach(function (item) { body.appendChild(item.row); });
    for (var i = 0; i < header.length; i += 1) {
      header[i].setAttribute("aria-sort", i === column ? (descending ? "descending" : "ascending") : "none");
    }
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
      var button = th.querySelector("button");
      if (!button) { return; }
      button.addEventListener("click", function () {
        sortTable(table, column, th.getAttribute("aria-sort") === "ascending");
      });
    });
  });
})();
